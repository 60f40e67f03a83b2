"""`tfsearch spaces`: the built-in search spaces, one line each."""

from __future__ import annotations

from tfsearch.run.space import builtin_spaces, load_space


def register(subparsers) -> None:
    parser = subparsers.add_parser("spaces", help="list the built-in search spaces")
    parser.set_defaults(func=run_spaces)


def run_spaces(args) -> int:
    for name, path in builtin_spaces().items():
        print(f"{name:<16} {load_space(str(path)).description}")
    return 0
