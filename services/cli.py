"""The `hifi` entry point: the library's command line, given the app's registry of services."""

from __future__ import annotations

from services.registry import SERVICES
from shared.cli import main as library_main


def main(argv: list[str] | None = None) -> None:
    library_main(argv, services=SERVICES)


if __name__ == "__main__":
    main()
