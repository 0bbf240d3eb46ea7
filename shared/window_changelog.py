"""The key window's changelog records (RocksKeyWindow in shared/keywindow.py): one record per partition and
batch, a msgpack array of entries, each the array [key, first_seen_ms, claim].

That is the layout the untyped code wrote (a list of lists), kept so a rolling upgrade restores from records
either version wrote (tests/test_window_changelog.py)."""

from __future__ import annotations

import msgspec


class ChangelogEntry(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One key's window entry. `claim`: the message that first claimed the key ("" for a ledger mark)."""

    key: str
    first_seen_ms: float
    claim: str


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[ChangelogEntry])


def encode_changelog(entries: list[ChangelogEntry]) -> bytes:
    return _encoder.encode(entries)


def decode_changelog(value: bytes | None) -> list[ChangelogEntry]:
    """Raises msgspec.DecodeError (its ValidationError too) on a record no version of the store wrote,
    a null value (a tombstone some operator tool wrote) included, so the restore skips it, as the untyped
    code did, instead of failing on every restart."""
    if value is None:
        raise msgspec.DecodeError("a changelog record without a value")
    return _decoder.decode(value)
