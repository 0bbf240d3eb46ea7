"""The code's layering: the library (shared/) never imports the app (services/); neither imports the dev tools."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):  # walks function bodies too: a lazy import is still an import
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_the_library_never_imports_the_app():
    sources = sorted((ROOT / "shared").rglob("*.py"))
    assert len(sources) > 10  # the walk found the library
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources
        for line, module in _imported_modules(path)
        if module == "services" or module.startswith("services.")
    ]
    assert offenders == []


def test_the_runtime_never_imports_the_dev_tools():
    sources = sorted((ROOT / "shared").rglob("*.py")) + sorted((ROOT / "services").rglob("*.py"))
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources
        for line, module in _imported_modules(path)
        if module == "devtools" or module.startswith("devtools.")
    ]
    assert offenders == []


@pytest.mark.slow  # over 10 s: `make quick` leaves it to `make test`
def test_the_runtime_wheel_carries_no_dev_tools(tmp_path):
    """The image installs this wheel: the dev tools (a local broker, chaos, bench) stay out of it."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("hifi-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {"shared", "services"} <= top_level
    assert "devtools" not in top_level and "tests" not in top_level


def test_the_dev_commands_reach_hifi_through_the_entry_point():
    """`hifi up`, `hifi kafka` ... come from the hifi-devtools distribution, not from the runtime's parser."""
    from importlib.metadata import entry_points

    from shared.cli import COMMAND_PLUGINS

    (entry,) = entry_points(group=COMMAND_PLUGINS)
    assert entry.value == "devtools.cli:register" and entry.dist is not None and entry.dist.name == "hifi-devtools"
    runtime_cli = (ROOT / "shared" / "cli.py").read_text()
    assert 'add_parser("kafka"' not in runtime_cli and 'add_parser("up"' not in runtime_cli


def test_the_pipeline_definition_keeps_the_deployed_names():
    """Groups, topics and ports are what installations already run with: renaming a group drops its offsets."""
    from shared import pipeline
    from shared.dlq import stage_input
    from shared.topics import Topics

    sinks = ["hook", "files"]
    assert [s.group("hook" if s.per_sink else None) for s in pipeline.STAGES] == [
        "hifi-collector",
        "hifi-enricher",
        "hifi-deduplicator",
        "hifi-router",
        "hifi-sender-hook",
        "hifi-auditor",
    ]
    assert [pipeline.stage(n).port(sinks) for n in ("collector", "enricher", "deduplicator", "router", "auditor")] == [
        8080,
        6067,
        6068,
        6069,
        6090,
    ]
    assert pipeline.SENDER.port(sinks, "files") == 6071
    topics = Topics("ns")
    assert topics.stage_group("sender.files") == "ns.hifi-sender-files"
    assert pipeline.dead_letter_stages(sinks) == ["enricher", "deduplicator", "router", "sender.hook", "sender.files"]
    assert [stage_input(topics, s, sinks) for s in pipeline.dead_letter_stages(sinks)] == [
        "ns.hifi.raw",
        "ns.hifi.enriched",
        "ns.hifi.unique",
        "ns.hifi.sink.hook",
        "ns.hifi.sink.files",
    ]
    assert topics.all(sinks) == [
        f"ns.{t}"
        for t in (
            "hifi.raw",
            "hifi.enriched",
            "hifi.unique",
            "hifi.sink.hook",
            "hifi.sink.files",
            "hifi.dlq.enricher",
            "hifi.dlq.deduplicator",
            "hifi.dlq.router",
            "hifi.dlq.sender.hook",
            "hifi.dlq.sender.files",
            "hifi.audit.tallies",
            "hifi.audit.receipts",
        )
    ]


def test_every_registered_service_has_a_place_in_the_pipeline():
    from services.registry import SERVICES
    from shared import pipeline

    assert list(SERVICES) == [s.name for s in pipeline.STAGES]


def _library_imports() -> dict[str, set[str]]:
    """shared.X -> the shared modules it imports (lazy ones too; `from shared import x` is shared.x)."""
    modules = {f"shared.{p.stem}" for p in (ROOT / "shared").glob("*.py")}
    graph: dict[str, set[str]] = {}
    for module in modules:
        tree = ast.parse((ROOT / "shared" / f"{module.split('.')[1]}.py").read_text())
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[module] = (found & modules) - {module}
    return graph


def test_the_library_has_no_import_cycle():
    """A cycle makes a module's meaning depend on import order; shared/ is layered (stage.py on its parts)."""
    graph = _library_imports()
    assert graph["shared.stage"] >= {"shared.flight", "shared.rebalance", "shared.watchdog"}  # the walk sees them
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
