"""The `hifi` entry point: the library's command line, given the app's registry of services."""

from __future__ import annotations

import sys

from shared.cli import main as library_main


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["run"]:  # only `run` builds services: `hifi trace` starts without importing every app
        library_main(argv)
        return
    from services.registry import SERVICES

    library_main(argv, services=SERVICES)


if __name__ == "__main__":
    main()
