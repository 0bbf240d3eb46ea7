"""The README's "Configuration reference" lists exactly the keys the config parser accepts, and every
environment variable `Settings` reads: a key added to the parser without a row, or a row for a key the
parser refuses, fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.config import SINK_TYPES, HifiConfig, Settings, config_keys
from shared.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Configuration reference"


def reference_section(text: str) -> str:
    """The text from the "Configuration reference" heading to the next level-2 heading."""
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end != -1 else len(text)]


def tables_by_heading(section: str) -> dict[str, set[str]]:
    """`#### \\`path\\`` heading -> the backticked names in the first column of the table under it."""
    tables: dict[str, set[str]] = {}
    heading: str | None = None
    for line in section.splitlines():
        if line.startswith("#"):
            found = re.match(r"#+ `([^`]+)`", line)
            heading = found.group(1) if found and line.startswith("#### ") else None
            if heading is not None:
                tables.setdefault(heading, set())
            continue
        if heading is None or not line.startswith("| "):
            continue
        first = line.split("|")[1].strip()
        if first in ("key", "variable") or set(first) <= set("- "):
            continue
        tables[heading].update(re.findall(r"`([^`]+)`", first))
    return tables


def env_table(section: str) -> set[str]:
    """The variables named in the first column of the table headed `| variable |`."""
    names: set[str] = set()
    in_table = False
    for line in section.splitlines():
        if line.startswith("| variable |"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            break
        if in_table and not line.startswith("| ---"):
            names.update(re.findall(r"`([A-Z_]+)`", line.split("|")[1]))
    return names


def test_the_reference_lists_every_key_of_every_section_and_no_other():
    tables = tables_by_heading(reference_section(README.read_text()))
    for path, keys in config_keys().items():
        assert path in tables, f"README has no `#### \\`{path}\\`` table"
        assert tables[path] - keys == set(), f"{path}: the README names keys the parser refuses"
        assert keys - tables[path] == set(), f"{path}: keys missing from the README"
    assert set(tables) - set(config_keys()) == set(), "README tables for sections the parser does not have"


def test_the_reference_lists_every_environment_variable():
    assert env_table(reference_section(README.read_text())) == set(Settings.ENV.values())


def test_a_key_removed_from_the_readme_fails_the_check():
    text = README.read_text()
    without = text.replace("| `max_depth` |", "| |", 1)
    assert without != text
    tables = tables_by_heading(reference_section(without))
    assert "max_depth" not in tables["limits"] and "max_depth" in config_keys()["limits"]


def test_config_keys_is_what_the_parser_accepts():
    """Each listed key passes the parser's unknown-field check, and a key not listed fails it."""
    base = {"tenants": {"a": {"api_keys": ["sha256:" + "0" * 64]}}, "sinks": {}}
    for path in ("(root)", "dedupe", "enrich", "limits", "audit"):
        for key in config_keys()[path]:
            data = {**base} if path == "(root)" else {**base, path: {key: None}}
            try:
                HifiConfig.parse(data)
            except ConfigError as exc:
                assert "unknown field" not in str(exc), f"{path}.{key}: {exc}"
        if path != "(root)":
            with pytest.raises(ConfigError, match=re.escape(f"{path}.not_a_key: unknown field")):
                HifiConfig.parse({**base, path: {"not_a_key": 1}})
    for kind in SINK_TYPES:
        with pytest.raises(ConfigError, match=re.escape("sinks.s.not_a_key: unknown field")):
            HifiConfig.parse({**base, "sinks": {"s": {"type": kind, "not_a_key": 1}}})
