"""``regdsl`` command line. Exit codes follow ruff: 0 clean, 1 problems found, 2 usage or IO error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .build import load
from .errors import RegDslError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regdsl", description="Declarative regularization for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="validate rule files", description="Validate .reg rule files.")
    check.add_argument("files", nargs="+", metavar="FILE", help="rule files to check")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error
        return int(exc.code or 0)
    return _check(args.files)


def _check(files: Sequence[str]) -> int:
    problems = statements = 0
    for path in files:
        try:
            spec = load(path)
        except OSError as exc:
            print(f"regdsl: error: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
        except RegDslError as exc:
            for diagnostic in exc.diagnostics:
                print(diagnostic.render())
            problems += len(exc.diagnostics)
            continue
        statements += len(spec.statements)
    if problems:
        print(f"Found {problems} error{'s' * (problems != 1)}.")
        return EXIT_PROBLEMS
    print(f"All checks passed: {len(files)} file{'s' * (len(files) != 1)}, {statements} statement{'s' * (statements != 1)}.")
    return EXIT_OK
