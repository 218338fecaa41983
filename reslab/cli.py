"""The ``reslab`` command. Thin: parse arguments, call a library function, print.

Each sub-command lives in ``reslab/commands/<name>.py`` and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` which sets ``func`` (a callable
taking the parsed namespace and returning an exit code) as a default.
User errors (``ValueError``, ``FileNotFoundError``, ``NotImplementedError`` for an analysis a model
family does not support) become one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order `reslab --help` lists them. A module that is
# missing (a feature not built yet) is skipped.
COMMANDS = ["models", "info", "zoo", "train", "eval", "demo", "sd", "lesion", "paths", "unravel", "study", "weights",
            "export"]


def _commands_for(argv: list[str] | None) -> list[str]:
    """The sub-command modules ``argv`` needs: only the named one (so that `reslab models` does not
    import the modules, and torch, of every other command), none for a bare ``--version``, and all
    for help or a misspelt command."""
    if argv is None:
        return COMMANDS
    named = next((a for a in argv if not a.startswith("-")), None)
    if named in COMMANDS:
        return [named]
    if named is None and "--version" in argv and not {"-h", "--help"} & set(argv):
        return []
    return COMMANDS


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every sub-command, or with only those ``argv`` needs (:func:`_commands_for`)."""
    from reslab import __version__

    parser = argparse.ArgumentParser(prog="reslab", description="Residual networks: build, train, understand.")
    parser.add_argument("--version", action="version", version=f"reslab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _commands_for(argv):
        try:
            mod = importlib.import_module(f"reslab.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"reslab.commands.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


class UserError(Exception):
    """An error caused by the user's input; printed as one line."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError, UserError, FileExistsError, NotADirectoryError,
            NotImplementedError) as e:  # NotImplementedError: e.g. lesioning FractalNet (no residual units)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"reslab {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reslab {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
