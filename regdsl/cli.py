"""The ``regdsl`` command line: ``check``, ``explain``, ``plot`` and ``fmt``.

Exit codes, as in ruff: 0 clean; 1 problems found (errors, warnings under
``--strict``, files ``fmt --check`` would change); 2 a usage error, an unreadable
file, a model that cannot be built, or output that could not be written (a closed pipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .build import parse
from .errors import Diagnostic, RegDslError
from .parser import decode_source

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


class _UsageError(Exception):
    """Ends the command with exit status 2 and a one-line message on stderr."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regdsl", description="Declarative regularization rules for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_options(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument(
            "--model", required=required, metavar="TARGET",
            help="'package.module:callable' or 'path/to/file.py:callable' returning an nn.Module",
        )
        p.add_argument(
            "--model-arg", action="append", default=[], metavar="KEY=VALUE",
            help="keyword argument for the callable; VALUE is a Python literal, else a string (repeatable)",
        )
        p.add_argument("--no-meta", action="store_true", help="build the model on the CPU, not on the meta device")

    check = commands.add_parser("check", help="validate rule files, optionally against a model")
    check.add_argument("files", nargs="+", metavar="FILE")
    model_options(check, required=False)
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    check.add_argument("--format", choices=("text", "json", "github"), default="text")

    explain = commands.add_parser("explain", help="show what every parameter gets, or the optimizer groups")
    explain.add_argument("file", metavar="FILE")
    model_options(explain, required=True)
    explain.add_argument("--format", choices=("table", "json", "csv"), default="table")
    explain.add_argument("--group", action="store_true", help="show the optimizer parameter groups instead")

    plot = commands.add_parser("plot", help="draw the weights of checkpoints per rule group (needs regdsl[plot])")
    plot.add_argument("file", metavar="FILE")
    model_options(plot, required=True)
    plot.add_argument("--checkpoint", nargs="+", required=True, metavar="PT", help="state_dict files, in training order")
    plot.add_argument("-o", "--output", required=True, metavar="PNG", help="the image to write; its extension names the format (png, pdf, svg...)")

    fmt = commands.add_parser("fmt", help="rewrite rule files in canonical form, keeping comments")
    fmt.add_argument("files", nargs="+", metavar="FILE")
    fmt.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    fmt.add_argument("--diff", action="store_true", help="change nothing; print a diff of what would change")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error
        return int(exc.code or 0)
    command = {"check": _check, "explain": _explain, "fmt": _fmt, "plot": _plot}[args.command]
    if hasattr(args, "files"):  # a file named twice (f.reg ./f.reg) is checked, or rewritten, once
        args.files = list({os.path.realpath(path): path for path in reversed(args.files)}.values())[::-1]
    try:
        return command(args)
    except _UsageError as exc:
        print(f"regdsl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`regdsl check ... | head`): stop quietly, as grep and ruff do; stdout
        # goes to devnull so that the interpreter's last flush does not print the same error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_USAGE


# ---------------------------------------------------------------- shared


def _read(path: str) -> str:
    return decode_source(_read_bytes(path), path)


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_all(paths: Sequence[str]) -> dict[str, bytes]:
    """Every file's bytes, read before any is checked or rewritten: one that cannot be read is a usage
    error that leaves no report half-printed and no file half-formatted. (A file that is not UTF-8
    is read, and reported with a position, as any invalid file.)"""
    return {path: _read_bytes(path) for path in paths}


def _load_spec(path: str):
    return parse(_read(path), path)


def _spec_or_report(path: str):
    """The file's spec, or None after printing its diagnostics to stderr (stdout is for the
    table, JSON, CSV or message a tool may be reading)."""
    try:
        return _load_spec(path)
    except RegDslError as exc:
        for d in exc.diagnostics:
            print(d.render(), file=sys.stderr)
        return None


def _model(args: argparse.Namespace):
    if not args.model:
        return None
    from .loading import ModelLoadError, load_model, parse_model_args

    try:
        kwargs = parse_model_args(args.model_arg)
    except ModelLoadError as exc:
        raise _UsageError(str(exc)) from None
    try:
        return load_model(args.model, kwargs, meta=not args.no_meta)
    except ModelLoadError as exc:
        raise _UsageError(f"cannot build the model: {exc}") from None


def _color() -> bool:
    # no-color.org: a NO_COLOR that is set and not empty turns colour off.
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------- check


def _check(args: argparse.Namespace) -> int:
    from .report import coverage_record, diagnostic_record, format_coverage, format_diagnostic, github_annotation

    model = _model(args)
    diagnostics: list[Diagnostic] = []
    files: list[dict[str, Any]] = []
    coverages = []
    texts = _read_all(args.files)
    for path in args.files:
        entry: dict[str, Any] = {"file": path, "statements": None, "coverage": None}
        files.append(entry)
        try:
            spec = parse(decode_source(texts[path], path), path)
        except RegDslError as exc:
            diagnostics += exc.diagnostics
            continue
        entry["statements"] = len(spec.statements)
        if model is not None:
            from .lint import check_resolution
            from .resolution import resolve

            resolution = resolve(spec, model)  # once: both the diagnostics and the coverage read it
            diagnostics += check_resolution(resolution)
            coverage = resolution.coverage()
            coverages.append((path, coverage))
            entry["coverage"] = coverage_record(coverage)
    if args.strict:
        diagnostics = [dataclasses.replace(d, severity="error") for d in diagnostics]
    errors = sum(d.severity == "error" for d in diagnostics)
    warnings = len(diagnostics) - errors

    if args.format == "json":
        document = {
            "model": args.model,
            "strict": args.strict,
            "files": files,
            "diagnostics": [diagnostic_record(d) for d in diagnostics],
            "summary": {"errors": errors, "warnings": warnings},
        }
        print(json.dumps(document, indent=2))
    elif args.format == "github":
        for d in diagnostics:
            print(github_annotation(d))
    else:
        color = _color()
        for d in diagnostics:
            print(format_diagnostic(d, color))
        for path, coverage in coverages:
            print(f"Coverage of {path} on {args.model}:")
            print(format_coverage(coverage))
        if diagnostics:
            print(f"Found {_plural(errors, 'error')} and {_plural(warnings, 'warning')}.")
        else:
            statements = sum(f["statements"] or 0 for f in files)
            print(f"All checks passed: {_plural(len(files), 'file')}, {_plural(statements, 'statement')}.")
    return EXIT_PROBLEMS if errors else EXIT_OK


# ---------------------------------------------------------------- explain


def _explain(args: argparse.Namespace) -> int:
    from .report import (
        explain_csv,
        explain_records,
        format_explain,
        format_groups,
        group_records,
        groups_csv,
    )
    from .resolution import resolve

    spec = _spec_or_report(args.file)
    if spec is None:
        return EXIT_PROBLEMS
    resolution = resolve(spec, _model(args))
    status = _explained_errors(resolution)
    if args.group:
        groups = resolution.groups_summary()
        if args.format == "json":
            print(json.dumps(group_records(groups), indent=2))
        elif args.format == "csv":
            print(groups_csv(groups), end="")
        else:
            print(format_groups(groups))
        return status
    rows, modules = list(resolution.rows), list(resolution.modules)
    if args.format == "json":
        print(json.dumps(explain_records(rows, modules), indent=2))
    elif args.format == "csv":
        print(explain_csv(rows), end="")
        acting = [m.name for m in modules if m.terms]
        if acting:  # one row per parameter: say what the CSV leaves out, rather than nothing
            shown = ", ".join(acting[:3]) + (f" and {len(acting) - 3} more" if len(acting) > 3 else "")
            print(
                f"regdsl: note: the CSV lists parameters; the activity terms of {_plural(len(acting), 'module')} "
                f"({shown}) are not in it: --format json or the table shows them",
                file=sys.stderr,
            )
    else:
        trainable = sum(r.trainable for r in rows)
        numel = sum(r.numel for r in rows)
        print(
            f"{args.file} on {args.model}: {_plural(len(rows), 'tensor')} ({trainable} trainable), "
            f"{numel:,} element{'' if numel == 1 else 's'}"
        )
        print(f"'set by' names the term and the line of {args.file} that set it.\n")
        print(format_explain(rows, modules))
    return status


def _explained_errors(resolution: Any) -> int:
    """What compile would refuse in the file explained (RD101, RD104...), on stderr: the table shows
    the file anyway, but no Regularizer would be built from it. Exit 1 then, as check does."""
    from .lint import check_resolution

    errors = [d for d in check_resolution(resolution) if d.severity == "error"]
    for diagnostic in errors:
        print(diagnostic.render(), file=sys.stderr)
    if errors:
        print(f"compile refuses this file: {_plural(len(errors), 'error')} (regdsl check shows every finding)", file=sys.stderr)
    return EXIT_PROBLEMS if errors else EXIT_OK


# ---------------------------------------------------------------- plot


def _plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise _UsageError("regdsl plot needs matplotlib: pip install 'regdsl[plot]'") from None
    from .plot import PlotError, output_format, weights
    from .resolution import resolve

    try:
        output_format(args.output)  # a bad -o is told before the model is built and the checkpoints read
    except PlotError as exc:
        raise _UsageError(str(exc)) from None
    spec = _spec_or_report(args.file)
    if spec is None:
        return EXIT_PROBLEMS
    model = _model(args)
    # A file compile refuses is refused here as explain refuses it: a picture of its groups would
    # show a layout that no training run can have had (a misspelt pattern's rule applied to nothing).
    if _explained_errors(resolve(spec, model)):
        return EXIT_PROBLEMS
    try:
        weights(spec, model, args.checkpoint, path=args.output)
    except PlotError as exc:
        raise _UsageError(str(exc)) from None
    print(f"wrote {args.output}")
    return EXIT_OK


# ---------------------------------------------------------------- fmt


def _fmt(args: argparse.Namespace) -> int:
    from .formatter import format_source

    changed = unchanged = failed = 0
    rewrites: list[tuple[str, str]] = []
    texts = _read_all(args.files)
    for path in args.files:
        try:
            text = decode_source(texts[path], path)
            formatted = format_source(text, path)
        except RegDslError as exc:
            for d in exc.diagnostics:  # with --diff, stdout is the patch alone
                print(d.render(), file=sys.stderr if args.diff else sys.stdout)
            failed += 1
            continue
        if formatted == text:
            unchanged += 1
            continue
        changed += 1
        if args.diff:
            sys.stdout.write(_unified_diff(text, formatted, path))
        elif args.check:
            print(f"Would reformat: {path}")
        else:
            rewrites.append((path, formatted))
    _write_all(rewrites)
    dry = args.check or args.diff
    verb = "would be reformatted" if dry else "reformatted"
    summary = [f"{_plural(changed, 'file')} {verb}", f"{unchanged} left unchanged"]
    if failed:
        summary.append(f"{failed} with errors")
    print(", ".join(summary) + ".", file=sys.stderr if args.diff else sys.stdout)
    if failed or (dry and changed):
        return EXIT_PROBLEMS
    return EXIT_OK


def _write_all(rewrites: Sequence[tuple[str, str]]) -> None:
    """Rewrite the files, after checking that every one of them opens for writing: a file that does
    not (read-only, immutable) is a usage error that leaves every file as it was."""
    for path, _ in rewrites:
        try:
            open(path, "r+b").close()  # opens for writing, changes nothing
        except OSError as exc:
            raise _UsageError(f"cannot write {path}: {exc.strerror or exc}; no file was reformatted") from None
    for k, (path, formatted) in enumerate(rewrites):
        try:
            Path(path).write_text(formatted, encoding="utf-8")
        except OSError as exc:  # after the check above: a full disk, say
            done = ", ".join(p for p, _ in rewrites[:k]) or "none"
            raise _UsageError(f"cannot write {path}: {exc.strerror or exc}; reformatted before it: {done}") from None


def _unified_diff(before: str, after: str, path: str) -> str:
    """A unified diff that marks a missing final newline, as ``diff -u`` does."""
    lines = []
    for line in difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), path, f"{path} (formatted)"
    ):
        lines.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(lines)
