"""What a sink's `hash`, `mask_ip` and `mask_email` transforms turn a value into."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from typing import Any

V4_MASK = (1 << 32) - (1 << 8)  # keeps the /24
V6_MASK = (1 << 128) - (1 << 80)  # keeps the /48


def hmac_hex(key: bytes, value: Any) -> str:
    """HMAC-SHA256 of a string's UTF-8 bytes (other values: their compact, key-sorted JSON), as hex."""
    data = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, data.encode(), hashlib.sha256).hexdigest()


def mask_ip(value: Any) -> str | None:
    """IPv4 to its /24, IPv6 to its /48 (network address); None when it is not an address.

    An IPv6 address that carries a client's IPv4 (mapped ::ffff:0:0/96, 6to4 2002::/16 whose /48 is the
    whole IPv4, Teredo 2001::/32 whose client is obfuscated but recoverable) is masked as that IPv4.
    """
    try:
        address = ipaddress.ip_address(str(value).strip())
    except ValueError:
        return None
    if address.version == 6:
        if address.ipv4_mapped is not None:  # its /48 would be `::`, telling nothing
            address = address.ipv4_mapped
        elif address.sixtofour is not None:
            address = address.sixtofour
        elif address.teredo is not None:
            address = address.teredo[1]  # (server, client)
    if address.version == 4:  # masking the integer is a quarter of the cost of building an ip_network
        return str(ipaddress.IPv4Address(int(address) & V4_MASK))
    return str(ipaddress.IPv6Address(int(address) & V6_MASK))


def mask_email(value: Any) -> str | None:
    """`alice@example.com` -> `a***@example.com`; None when it is not an address."""
    if not isinstance(value, str):
        return None
    local, at, domain = value.strip().rpartition("@")
    if not at or not local or not domain:
        return None
    return f"{local[0]}***@{domain}"
