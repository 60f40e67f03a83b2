"""tfsearch: per-class hyperparameter search for TransFusion anomaly detection, on a machine or a cluster.

One module per command (`tfsearch/cli/<command>.py`: its parser and the call into the library) registers
itself through `register(subparsers)`; this file only assembles them and turns errors and interruptions
into exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import signal
import sys

from tfsearch.errors import InputError, Interrupted

# modules that define a `register(subparsers)` function, in the order `tfsearch --help` lists them
COMMAND_MODULES = tuple(
    f"tfsearch.cli.{name}"
    for name in ("run", "spaces", "train", "evaluate", "export", "predict", "score", "demo", "report")
)


def build_parser(modules: tuple[str, ...] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The parser of the subcommands of `modules`; a subset imports only what those need (a GPU image
    without Ray or Optuna can still train and evaluate: bench/gpu_paper_demo.sh)."""
    parser = argparse.ArgumentParser(prog="tfsearch", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None, modules: tuple[str, ...] = COMMAND_MODULES) -> int:
    parser = build_parser(modules)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"tfsearch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"tfsearch {args.command}: {interruption_note(exc, argv, args)}", file=sys.stderr)
        return exc.exit_code


def interruption_note(exc: Interrupted, argv: list[str], args: argparse.Namespace) -> str:
    """What stopped, where, and the command that continues it (commands with --resume)."""
    where = f" during {exc.stage}" if exc.stage else ""
    note = f"interrupted by {signal.Signals(exc.signum).name}{where}; nothing unfinished was published"
    if not hasattr(args, "resume"):
        return note
    again = argv if "--resume" in argv else [*argv, "--resume"]
    return f"{note}. Continue with: tfsearch {shlex.join(again)}"


if __name__ == "__main__":
    sys.exit(main())
