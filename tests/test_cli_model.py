"""`regdsl check --model` and `regdsl explain`, run through the installed entry point.

Every expected number, name and line below is derived by hand from the rule text
and the model's structure (examples/train.py's Classifier: Linear(16, h), LayerNorm(h),
GELU, Linear(h, h), LayerNorm(h), GELU, then head = Linear(h, 4); h = hidden = 64).

Each run imports torch (about 2 s of CPU), so there are few of them: the `cli`
fixture starts every run of this file at once on a thread pool, longest first,
each test waits only for the runs it reads, and each run is asked as many
questions as it can answer. Where many inputs take the same path (the ways a
--model target can fail), a few go through the entry point and the rest through
`regdsl.cli.main`, the function the entry point calls.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from support import aligned_cells, entry_point, table_columns

ROOT = Path(__file__).resolve().parent.parent
CLASSIFIER = "examples/train.py:Classifier"
RULES = "examples/rules.reg"  # 3 all decay 0.05 / 4 exclude bias / 5 exclude norm / 6 layer head.** decay 0.1 l1 1e-4
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """One run, stdout and stderr piped; from the repository root so `examples/...` targets resolve."""
    return subprocess.run(
        [*entry_point(), *args], check=False, capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


def run_in_pty(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run with stdout on a pseudo-terminal (so isatty() is true); return the exit code and the output."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [*entry_point(), *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.DEVNULL, env=env, cwd=ROOT
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    code = proc.wait(timeout=60)
    # The terminal turns '\n' into '\r\n'.
    return code, b"".join(chunks).decode("utf-8").replace("\r\n", "\n")


def no_crash(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert "\x1b[" not in result.stdout + result.stderr, "colour codes in piped output"


# ---------------------------------------------------------------- inputs

# A warnings-only file for the Classifier: an exclude that matches nothing (RD201)
# and l2 stacked on the decay of line 2 (RD204). No RD1xx error. Line 6 leaves one
# tensor with no term (a zero) without excluding it, so 'nothing' and 'excluded' differ.
WARN_RULES = """\
# warnings only
all decay 0.05
exclude bias
exclude layer bdy.0
layer head l2 0.01
layer body.4.weight decay 0
"""

FACTORIES = '''\
import torch
from torch import nn

NOT_CALLABLE = 3


def build(name="enc", width=2, bias=True):
    # Fails loudly when an argument arrives with the wrong type.
    if not (isinstance(name, str) and type(width) is int and type(bias) is bool):
        raise TypeError(f"bad types: {type(name).__name__} {type(width).__name__} {type(bias).__name__}")
    return nn.ModuleDict({name: nn.Linear(width, 3, bias=bias)})


def returns_tensor():
    return torch.zeros(2)


def explodes():
    raise RuntimeError("constructor exploded on purpose")
'''


class Runs:
    """The files written for this module and the runs started on them, by name."""

    def __init__(self, work: Path, pool: ThreadPoolExecutor):
        self.work = work
        self.pool = pool
        self.futures: dict[str, Future] = {}

    def start(self, name: str, job: Callable[[], object]) -> None:
        self.futures[name] = self.pool.submit(job)

    def __getitem__(self, name: str):
        return self.futures[name].result()


# Through the entry point; every case of _bad_target_cases also goes through main().
ENTRY_POINT_BAD_TARGETS = {"missing-file", "positional-args-missing"}  # check, explain


def _bad_target_cases(work: Path) -> list[tuple[str, tuple[str, ...], str]]:
    """(name, arguments after the rule file, what the one-line message on stderr must say)."""
    f = work / "factories.py"
    return [
        ("missing-file", ("--model", f"{work}/missing.py:build"), f"no such file: {work}/missing.py"),
        ("missing-attribute", ("--model", f"{f}:nope"), f"'{f}' has no attribute 'nope'"),
        ("not-callable", ("--model", f"{f}:NOT_CALLABLE"), f"'{f}:NOT_CALLABLE' is not callable"),
        ("not-a-module", ("--model", f"{f}:returns_tensor"), "returned Tensor, not a torch.nn.Module"),
        ("constructor-raises", ("--model", f"{f}:explodes"), "RuntimeError: constructor exploded on purpose"),
        # A bare word is a string, so the factory's type check fails: the message shows what it got.
        ("bad-arg-type", ("--model", f"{f}:build", "--model-arg", "width=wide"), "TypeError: bad types: str str bool"),
        ("bad-arg-key", ("--model", f"{f}:build", "--model-arg", "1x=3"), "KEY=VALUE"),
        ("file-import-fails", ("--model", f"{work}/import_fails.py:build"), "ZeroDivisionError"),
        ("package-missing-attribute", ("--model", "torch.nn:NoSuchLayer"), "'torch.nn' has no attribute 'NoSuchLayer'"),
        ("package-missing", ("--model", "no_such_package_regdsl_test.models:build"),
         "cannot import 'no_such_package_regdsl_test.models'"),
        ("no-colon", ("--model", "examples/train.py"),
         "expects 'package.module:callable' or 'path/to/file.py:callable'"),
        ("positional-args-missing", ("--model", "torch.nn:Linear"), "calling torch.nn:Linear failed: TypeError"),
    ]


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    entry_point()  # skip the module early when there is no entry point
    work = tmp_path_factory.mktemp("cli_model")
    (work / "warn.reg").write_text(WARN_RULES, encoding="utf-8")
    (work / "broken.reg").write_text("all decay 0.05\nall l3 1\n", encoding="utf-8")
    # A ',' and a ':' in the file name and a '%' in the message must be escaped for GitHub.
    (work / "odd,name:1.reg").write_text('all decay 0.05\nexclude layer "50%_off"\n', encoding="utf-8")
    (work / "linear.reg").write_text("all decay 0.1\nexclude bias\n", encoding="utf-8")
    (work / "l2.reg").write_text("all l2 0.5\n", encoding="utf-8")
    (work / "factories.py").write_text(FACTORIES, encoding="utf-8")
    (work / "import_fails.py").write_text("1 / 0\n", encoding="utf-8")
    (work / "raises_on_import_regdsl.py").write_text("raise RuntimeError('module-level failure')\n", encoding="utf-8")
    (work / "cwd_models_regdsl.py").write_text("from torch import nn\ndef build():\n    return nn.Linear(2, 2)\n")
    warn, odd, linear = str(work / "warn.reg"), str(work / "odd,name:1.reg"), str(work / "linear.reg")

    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
    runs = Runs(work, pool)
    start = lambda name, *args, **kw: runs.start(name, lambda: run(*args, **kw))
    # Longest first.
    start("gpt2-table", "explain", "examples/gpt2.reg", "--model", "examples/models.py:tiny_gpt2")
    (work / "typo.reg").write_text("all decay 0.01\nlayer haed l1 1\n", encoding="utf-8")
    start("explain-refused", "explain", str(work / "typo.reg"), "--model", CLASSIFIER, "--group")
    start("text", "check", warn, "--model", CLASSIFIER)
    start("text-strict", "check", warn, "--model", CLASSIFIER, "--strict")
    start("json-strict", "check", warn, str(work / "broken.reg"), "--model", CLASSIFIER, "--format", "json", "--strict")
    start("github", "check", warn, odd, "--model", CLASSIFIER, "--format", "github")
    start("hidden32", "check", RULES, "--model", CLASSIFIER, "--model-arg", "hidden=32", "--no-meta")
    # bias=False must arrive as the literal False, not as the (truthy) string 'False'.
    start("linear", "check", linear, "--model", "torch.nn:Linear", "--model-arg", "in_features=3",
          "--model-arg", "out_features=2", "--model-arg", "bias=False", "--format", "json")
    # A quoted value is the string '7' (a valid module name); width=5 an int, bias=False a bool.
    start("model-args", "explain", str(work / "l2.reg"), "--model", f"{work}/factories.py:build", "--format", "csv",
          "--model-arg", "name='7'", "--model-arg", "width=5", "--model-arg", "bias=False")
    explain = ("explain", RULES, "--model", CLASSIFIER)
    start("explain-table", *explain)
    start("explain-json", *explain, "--format", "json")
    start("explain-csv", *explain, "--format", "csv")
    start("groups-table", *explain, "--group", "--model-arg", "hidden=32")
    for name, args, _ in _bad_target_cases(work):
        if name in ENTRY_POINT_BAD_TARGETS:
            command = "explain" if name == "positional-args-missing" else "check"
            start(f"bad:{name}", command, str(work / "l2.reg"), *args)
    start("cwd-module", "check", "l2.reg", "--model", "cwd_models_regdsl:build", cwd=work)
    # Colour: no model is needed for a diagnostic, so these runs are about the terminal alone.
    broken = str(work / "broken.reg")
    if hasattr(os, "openpty"):
        for name, env in (
            ("colour-tty", _env(NO_COLOR=None, TERM="xterm")),
            ("colour-tty-no-color", _env(NO_COLOR="1", TERM="xterm")),
        ):
            runs.start(name, lambda env=env: run_in_pty("check", broken, env=env))
    yield runs
    pool.shutdown(wait=True)


# Coverage of WARN_RULES on the default Classifier, by hand:
# decay: body.0.weight 64x16 + body.1.weight 64 + body.3.weight 64x64 + head.weight 4x64
#        = 1024 + 64 + 4096 + 256 = 5440 in 4 tensors; l2: head.weight, 256;
# excluded: the 5 biases, 64 * 4 + 4 = 260; nothing: those and body.4.weight (decay 0), 324.
WARN_COVERAGE = [
    "  decay       4 tensors  5,440 elements",
    "  l1          0 tensors      0 elements",
    "  l2          1 tensor     256 elements",
    "  nothing     6 tensors    324 elements",
    "    excluded  5 tensors    260 elements",
    "  frozen      0 tensors      0 elements",
]
RD204_MESSAGE = (
    "'head.weight' also gets decay from line 2: decay and l2 both shrink the weights (double regularization)"
)


# ---------------------------------------------------------------- check --model: text, --strict


def test_check_text_and_strict_on_a_warnings_only_file(cli: Runs) -> None:
    warn = cli.work / "warn.reg"
    plain, strict = cli["text"], cli["text-strict"]
    for result in (plain, strict):
        no_crash(result)
        assert result.stderr == ""
    assert plain.returncode == 0
    assert strict.returncode == 1  # --strict: the same warnings fail the run

    for result, severity in ((plain, "warning"), (strict, "error")):
        out = result.stdout.splitlines()
        assert out[0].startswith(f"{warn}:4:15: {severity}: RD201 layer pattern 'bdy.0' matches no parameter or module")
        assert "nearest: 'body.0'" in out[0]
        assert out[1:3] == ["exclude layer bdy.0", " " * 14 + "^" * 5]
        assert out[3:6] == [
            f"{warn}:5:12: {severity}: RD204 {RD204_MESSAGE}",
            "layer head l2 0.01",
            " " * 11 + "^" * 7,  # the whole term 'l2 0.01'
        ]
        assert out[6] == f"Coverage of {warn} on {CLASSIFIER}:"
        assert out[7:13] == WARN_COVERAGE
        assert len(out) == 14  # and nothing else: no coverage of a second file, no stray line
    assert plain.stdout.splitlines()[-1] == "Found 0 errors and 2 warnings."
    assert strict.stdout.splitlines()[-1] == "Found 2 errors and 0 warnings."


def test_check_with_model_args_and_no_meta_counts_the_smaller_model(cli: Runs) -> None:
    # hidden=32: body.0.weight 32x16=512, body.3.weight 32x32=1024, head.weight 4x32=128 get decay (1664);
    # head.weight also l1; the six bias/LayerNorm tensors of 32 and head.bias (4) are excluded: 196.
    result = cli["hidden32"]
    no_crash(result)
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"Coverage of {RULES} on {CLASSIFIER}:",
        "  decay       3 tensors  1,664 elements",
        "  l1          1 tensor     128 elements",
        "  l2          0 tensors      0 elements",
        "  nothing     7 tensors    196 elements",
        "    excluded  7 tensors    196 elements",
        "  frozen      0 tensors      0 elements",
        "All checks passed: 1 file, 4 statements.",
    ]


# ---------------------------------------------------------------- check --model: json, github


def test_check_json_is_one_document_field_by_field(cli: Runs) -> None:
    warn, broken = str(cli.work / "warn.reg"), str(cli.work / "broken.reg")
    result = cli["json-strict"]
    no_crash(result)
    assert result.returncode == 1
    doc = json.loads(result.stdout)  # the whole of stdout is the one document
    assert set(doc) == {"model", "strict", "files", "diagnostics", "summary"}
    assert doc["model"] == CLASSIFIER
    assert doc["strict"] is True
    count = lambda t, e: {"tensors": t, "elements": e}
    assert doc["files"] == [
        {
            "file": warn,
            "statements": 5,
            "coverage": {
                "terms": {
                    "decay": count(4, 5440), "l1": count(0, 0), "l2": count(1, 256),
                    "group_lasso": count(0, 0), "orthogonal": count(0, 0), "max_norm": count(0, 0),
                },
                "nothing": count(6, 324),
                "excluded": count(5, 260),
                "frozen": count(0, 0),
            },
        },
        # A file that does not parse has no statement count and no coverage.
        {"file": broken, "statements": None, "coverage": None},
    ]
    diagnostics = doc["diagnostics"]
    keys = {"code", "severity", "file", "line", "column", "end_line", "end_column", "message"}
    assert [set(d) for d in diagnostics] == [keys] * 3
    rd201, rd204, rd001 = diagnostics
    assert {k: v for k, v in rd201.items() if k != "message"} == {
        "code": "RD201", "severity": "error", "file": warn, "line": 4, "column": 15, "end_line": 4, "end_column": 20,
    }
    assert rd201["message"].startswith("layer pattern 'bdy.0' matches no parameter or module; nearest: ")
    assert rd204 == {
        "code": "RD204", "severity": "error", "file": warn,
        "line": 5, "column": 12, "end_line": 5, "end_column": 19, "message": RD204_MESSAGE,
    }
    assert {k: v for k, v in rd001.items() if k != "message"} == {
        "code": "RD001", "severity": "error", "file": broken, "line": 2, "column": 5, "end_line": 2, "end_column": 7,
    }
    assert "did you mean 'l2'?" in rd001["message"]
    assert doc["summary"] == {"errors": 3, "warnings": 0}


GITHUB = re.compile(
    r"::(?P<severity>error|warning) file=(?P<file>[^,]*),line=(?P<line>\d+),col=(?P<col>\d+),"
    r"endLine=(?P<end_line>\d+),endColumn=(?P<end_col>\d+),title=(?P<title>[^:]*)::(?P<message>.*)"
)


def test_check_github_annotations_are_parseable_and_escaped(cli: Runs) -> None:
    warn, odd = str(cli.work / "warn.reg"), str(cli.work / "odd,name:1.reg")
    result = cli["github"]
    no_crash(result)
    assert result.returncode == 0  # warnings only
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    parsed = [GITHUB.fullmatch(line) for line in lines]
    assert all(parsed), lines
    fields = [m.groupdict() for m in parsed]
    assert [(f["severity"], f["title"], f["line"], f["col"], f["end_line"], f["end_col"]) for f in fields] == [
        ("warning", "RD201", "4", "15", "4", "20"),
        ("warning", "RD204", "5", "12", "5", "19"),
        ("warning", "RD201", "2", "15", "2", "24"),  # '"50%_off"' with its quotes is 9 characters
    ]
    assert fields[0]["file"] == fields[1]["file"] == warn
    assert fields[1]["message"] == RD204_MESSAGE
    assert fields[2]["file"] == odd.replace(",", "%2C").replace(":", "%3A")
    assert fields[2]["message"] == "layer pattern '50%25_off' matches no parameter or module"


def test_github_annotation_escapes_newlines_and_carriage_returns() -> None:
    from regdsl.errors import Diagnostic
    from regdsl.report import github_annotation

    d = Diagnostic(line=3, column=2, message="50% of a\r\nb", file="a,b:c.reg", severity="warning", code="RD201")
    # No end position: the annotation spans one character.
    assert github_annotation(d) == (
        "::warning file=a%2Cb%3Ac.reg,line=3,col=2,endLine=3,endColumn=3,title=RD201::50%25 of a%0D%0Ab"
    )


# ---------------------------------------------------------------- --model targets


def test_package_module_target_with_literal_model_args(cli: Runs) -> None:
    # torch.nn:Linear(in_features=3, out_features=2, bias=False): one 2x3 weight, no bias.
    result = cli["linear"]
    no_crash(result)
    assert result.returncode == 0  # one warning
    doc = json.loads(result.stdout)
    assert doc["model"] == "torch.nn:Linear"
    coverage = doc["files"][0]["coverage"]
    assert coverage["terms"]["decay"] == {"tensors": 1, "elements": 6}
    assert coverage["excluded"] == {"tensors": 0, "elements": 0}
    assert coverage["nothing"] == {"tensors": 0, "elements": 0}
    (d,) = doc["diagnostics"]  # 'exclude bias' has nothing left to exclude
    assert (d["code"], d["severity"], d["line"], d["column"]) == ("RD201", "warning", 2, 9)
    assert d["message"] == "no parameter in the model is selected by 'bias'"
    assert doc["summary"] == {"errors": 0, "warnings": 1}


def test_model_args_are_python_literals_else_strings(cli: Runs) -> None:
    result = cli["model-args"]
    no_crash(result)
    assert result.returncode == 0, result.stderr
    # ModuleDict({'7': Linear(5, 3, bias=False)}) under 'all l2 0.5'.
    assert result.stdout.splitlines()[1:] == ["7.weight,,3x5,15,True,,,,,,0.5,1"]


def _check_bad_target(code: int, out: str, err: str, message: str) -> None:
    assert code == 2, (out, err)
    assert "Traceback" not in err, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    # A malformed --model-arg is the user's typing, not the model's failure: it is not called one.
    prefix = "regdsl: error: --model-arg" if message == "KEY=VALUE" else "regdsl: error: cannot build the model: "
    assert lines[0].startswith(prefix), lines[0]
    assert message in lines[0]


@pytest.mark.parametrize("name", sorted(ENTRY_POINT_BAD_TARGETS))
def test_bad_targets_through_the_entry_point_exit_2_without_traceback(cli: Runs, name: str) -> None:
    (message,) = [case[2] for case in _bad_target_cases(cli.work) if case[0] == name]
    result = cli[f"bad:{name}"]
    _check_bad_target(result.returncode, result.stdout, result.stderr, message)


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The function behind the entry point, in this process: exit status, stdout, stderr."""
    from regdsl.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", [case[0] for case in _bad_target_cases(Path("/x"))])
def test_every_bad_target_is_one_line_and_exit_2(cli: Runs, capsys: pytest.CaptureFixture[str], name: str) -> None:
    (args, message), = [case[1:] for case in _bad_target_cases(cli.work) if case[0] == name]
    command = "explain" if name == "positional-args-missing" else "check"
    _check_bad_target(*_main(capsys, command, str(cli.work / "l2.reg"), *args), message)


def test_package_module_that_raises_on_import_exits_2(
    cli: Runs, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(cli.work))
    monkeypatch.delitem(sys.modules, "raises_on_import_regdsl", raising=False)
    code, out, err = _main(capsys, "check", str(cli.work / "l2.reg"), "--model", "raises_on_import_regdsl:build")
    _check_bad_target(code, out, err, "RuntimeError: module-level failure")


def test_module_in_the_working_directory_is_importable(cli: Runs) -> None:
    result = cli["cwd-module"]
    assert result.returncode == 0, result.stderr


def test_check_without_a_model_does_not_import_torch(tmp_path: Path) -> None:
    path = tmp_path / "r.reg"
    path.write_text("all l2 1\nall l3 1\n", encoding="utf-8")
    code = (
        "import sys\nfrom regdsl.cli import main\n"
        f"status = main(['check', {str(path)!r}])\n"
        "print('torch' in sys.modules, status, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.stderr.split() == ["False", "1"]


# ---------------------------------------------------------------- colour


def test_colour_only_on_a_terminal_and_never_with_no_color(cli: Runs) -> None:
    # Piped: every other run of this file checks that its output has no escape code (no_crash).
    if "colour-tty" not in cli.futures:
        pytest.skip("no pseudo-terminals on this platform")
    broken = cli.work / "broken.reg"
    code, shown = cli["colour-tty"]
    assert code == 1
    assert f"\x1b[1m{broken}:2:5:\x1b[0m \x1b[1;31merror:\x1b[0m \x1b[1mRD001\x1b[0m unexpected 'l3'" in shown
    assert "\nall l3 1\n\x1b[1;34m    ^^\x1b[0m\n" in shown  # the caret under 'l3', in blue
    # Colour is the only difference from the plain text.
    plain = ANSI.sub("", shown).splitlines()
    assert plain[0].startswith(f"{broken}:2:5: error: RD001 unexpected 'l3'; expected ")
    assert plain[0].endswith("; did you mean 'l2'?")
    assert plain[1:] == ["all l3 1", "    ^^", "Found 1 error and 0 warnings."]

    code, shown = cli["colour-tty-no-color"]
    assert code == 1
    assert "\x1b" not in shown
    assert shown.splitlines() == plain


# ---------------------------------------------------------------- tables


# ---------------------------------------------------------------- explain on the Classifier

# (name, shape, numel, decay, l1, l2, set by), derived from rules.reg by hand.
CLASSIFIER_ROWS = [
    ("body.0.weight", "64x16", "1,024", "0.05", "-", "-", "decay:3"),
    ("body.0.bias", "64", "64", "-", "-", "-", "excluded:4"),
    ("body.1.weight", "64", "64", "-", "-", "-", "excluded:5"),  # LayerNorm
    ("body.1.bias", "64", "64", "-", "-", "-", "excluded:4"),  # bias and norm: the first exclude
    ("body.3.weight", "64x64", "4,096", "0.05", "-", "-", "decay:3"),
    ("body.3.bias", "64", "64", "-", "-", "-", "excluded:4"),
    ("body.4.weight", "64", "64", "-", "-", "-", "excluded:5"),
    ("body.4.bias", "64", "64", "-", "-", "-", "excluded:4"),
    ("head.weight", "4x64", "256", "0.1", "0.0001", "-", "decay:6 l1:6"),
    ("head.bias", "4", "4", "-", "-", "-", "excluded:4"),
]


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    no_crash(result)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result


def test_explain_of_a_file_compile_refuses_says_so_and_exits_1(cli: Runs) -> None:
    # Before: the table alone, exit 0, for a file that regdsl.compile refuses (RD101 'haed').
    result = cli["explain-refused"]
    assert result.returncode == 1, result
    assert result.stdout.splitlines()[2].split() == ["decay=0.01", "0.01", "10", "5,764"]  # the table still shows
    lines = result.stderr.splitlines()
    assert lines[0].endswith("typo.reg:2:7: error: RD101 layer pattern 'haed' matches no parameter or module; nearest: 'head'")
    assert lines[1:] == ["layer haed l1 1", "      ^^^^", "compile refuses this file: 1 error (regdsl check shows every finding)"]


def test_explain_table(cli: Runs) -> None:
    lines = _ok(cli["explain-table"]).stdout.splitlines()
    assert lines[0] == f"{RULES} on {CLASSIFIER}: 10 tensors (10 trainable), 5,764 elements"
    assert lines[1] == f"'set by' names the term and the line of {RULES} that set it."
    assert lines[2] == ""
    table = lines[3:]
    assert len(table) == 2 + len(CLASSIFIER_ROWS)
    cells = aligned_cells(table, right={2})  # numel is right-aligned
    assert cells[0] == ["parameter", "shape", "numel", "decay", "l1", "l2", "set by (line)"]
    assert [tuple(c) for c in cells[1:]] == CLASSIFIER_ROWS


def test_explain_json(cli: Runs) -> None:
    document = json.loads(_ok(cli["explain-json"]).stdout)
    assert document["modules"] == []  # the classifier's rules have no activity term
    records = document["parameters"]
    assert [r["name"] for r in records] == [row[0] for row in CLASSIFIER_ROWS]
    by_name = {r["name"]: r for r in records}
    for r in records:
        assert set(r) == {"name", "aliases", "shape", "numel", "trainable", "excluded_by", "cleared_by", "terms"}
        assert r["aliases"] == [] and r["trainable"] is True
    assert by_name["body.0.weight"] == {
        "name": "body.0.weight", "aliases": [], "shape": [64, 16], "numel": 1024, "trainable": True,
        "excluded_by": None, "cleared_by": None,
        "terms": {"decay": {"value": 0.05, "text": "0.05", "file": RULES, "line": 3, "column": 5}},
    }
    assert by_name["body.1.bias"]["excluded_by"] == {"file": RULES, "line": 4, "column": 1}
    assert by_name["body.1.bias"]["terms"] == {}
    assert by_name["body.4.weight"]["excluded_by"] == {"file": RULES, "line": 5, "column": 1}
    assert by_name["head.weight"]["shape"] == [4, 64] and by_name["head.weight"]["numel"] == 256
    # 'layer head.** decay 0.1 l1 1e-4': decay at column 15, l1 at column 25.
    assert by_name["head.weight"]["terms"] == {
        "decay": {"value": 0.1, "text": "0.1", "file": RULES, "line": 6, "column": 15},
        "l1": {"value": 0.0001, "text": "0.0001", "file": RULES, "line": 6, "column": 25},
    }
    assert sum(r["numel"] for r in records) == 5764


def test_explain_csv(cli: Runs) -> None:
    rows = list(csv.reader(io.StringIO(_ok(cli["explain-csv"]).stdout)))
    assert rows[0] == [
        "name", "aliases", "shape", "numel", "trainable", "excluded_by_line",
        "decay", "decay_line", "l1", "l1_line", "l2", "l2_line",
    ]
    assert [r[0] for r in rows[1:]] == [row[0] for row in CLASSIFIER_ROWS]
    by_name = {r[0]: r for r in rows[1:]}
    assert by_name["body.0.weight"] == ["body.0.weight", "", "64x16", "1024", "True", "", "0.05", "3", "", "", "", ""]
    assert by_name["body.1.weight"] == ["body.1.weight", "", "64", "64", "True", "5", "", "", "", "", "", ""]
    assert by_name["head.weight"] == ["head.weight", "", "4x64", "256", "True", "", "0.1", "6", "0.0001", "6", "", ""]
    assert [r[5] for r in rows[1:]] == ["", "4", "5", "4", "", "4", "5", "4", "", "4"]


def test_explain_groups(cli: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    # hidden=32: body.0.weight 32x16 + body.3.weight 32x32 = 1,536; head.weight 4x32 = 128;
    # no_decay: six tensors of 32 and head.bias (4) = 196. Groups in the order of their first tensor.
    lines = _ok(cli["groups-table"]).stdout.splitlines()
    assert len(lines) == 5
    assert aligned_cells(lines, right={2, 3}) == [
        ["group", "weight_decay", "tensors", "elements"],
        ["decay=0.05", "0.05", "2", "1,536"],
        ["no_decay", "0", "7", "196"],
        ["decay=0.1", "0.1", "1", "128"],
    ]

    # The same groups as JSON and CSV, from main() (the entry point calls it; the formats are the point here).
    explain = ("explain", str(ROOT / RULES), "--model", str(ROOT / CLASSIFIER), "--group")
    code, out, err = _main(capsys, *explain, "--format", "csv", "--model-arg", "hidden=32")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "name,weight_decay,schedule,lr_mult,tensors,elements",
        "decay=0.05,0.05,,1.0,2,1536", "no_decay,0.0,,1.0,7,196", "decay=0.1,0.1,,1.0,1,128",
    ]
    code, out, err = _main(capsys, *explain, "--format", "json")  # default hidden=64
    assert (code, err) == (0, "")
    groups = json.loads(out)
    assert groups == [
        {"name": "decay=0.05", "weight_decay": 0.05, "schedule": "", "lr_mult": 1.0, "tensors": 2, "elements": 1024 + 4096,
         "params": ["body.0.weight", "body.3.weight"]},
        {"name": "no_decay", "weight_decay": 0.0, "schedule": "", "lr_mult": 1.0, "tensors": 7, "elements": 6 * 64 + 4,
         "params": ["body.0.bias", "body.1.weight", "body.1.bias", "body.3.bias", "body.4.weight", "body.4.bias",
                    "head.bias"]},
        {"name": "decay=0.1", "weight_decay": 0.1, "schedule": "", "lr_mult": 1.0, "tensors": 1, "elements": 256,
         "params": ["head.weight"]},
    ]
    # The groups partition the model: their totals are the explain totals (10 tensors, 5,764 elements).
    assert sum(g["tensors"] for g in groups) == 10
    assert sum(g["elements"] for g in groups) == 5764


# ---------------------------------------------------------------- explain on GPT-2: long names stay aligned


def _gpt2_expected() -> list[tuple[str, ...]]:
    """examples/models.py:tiny_gpt2 (2 layers, width 64, vocab 1000, 128 positions) under examples/gpt2.reg:
    3 all decay 0.1 / 4 exclude bias / 5 exclude norm / 6 exclude embedding / 7 type Conv1D l1 1e-6."""
    rows = [
        ("transformer.wte.weight", "lm_head.weight", "1000x64", "64,000", "-", "-", "-", "excluded:6"),
        ("transformer.wpe.weight", "", "128x64", "8,192", "-", "-", "-", "excluded:6"),
    ]
    conv = "0.1", "1e-06", "-", "decay:3 l1:7"
    excluded = lambda line: ("-", "-", "-", f"excluded:{line}")
    for i in range(2):
        h = f"transformer.h.{i}"
        rows += [
            (f"{h}.ln_1.weight", "", "64", "64", *excluded(5)),
            (f"{h}.ln_1.bias", "", "64", "64", *excluded(4)),
            (f"{h}.attn.c_attn.weight", "", "64x192", "12,288", *conv),  # Conv1D stores (in, out)
            (f"{h}.attn.c_attn.bias", "", "192", "192", *excluded(4)),
            (f"{h}.attn.c_proj.weight", "", "64x64", "4,096", *conv),
            (f"{h}.attn.c_proj.bias", "", "64", "64", *excluded(4)),
            (f"{h}.ln_2.weight", "", "64", "64", *excluded(5)),
            (f"{h}.ln_2.bias", "", "64", "64", *excluded(4)),
            (f"{h}.mlp.c_fc.weight", "", "64x256", "16,384", *conv),
            (f"{h}.mlp.c_fc.bias", "", "256", "256", *excluded(4)),
            (f"{h}.mlp.c_proj.weight", "", "256x64", "16,384", *conv),
            (f"{h}.mlp.c_proj.bias", "", "64", "64", *excluded(4)),
        ]
    rows += [
        ("transformer.ln_f.weight", "", "64", "64", *excluded(5)),
        ("transformer.ln_f.bias", "", "64", "64", *excluded(4)),
    ]
    return rows


def test_explain_table_on_gpt2_keeps_long_names_whole_and_aligned(cli: Runs) -> None:
    pytest.importorskip("transformers")
    lines = _ok(cli["gpt2-table"]).stdout.splitlines()
    # wte 64,000 + wpe 8,192 + 2 blocks of 49,984 + ln_f 128; the tied lm_head is not counted twice.
    assert lines[0] == "examples/gpt2.reg on examples/models.py:tiny_gpt2: 28 tensors (28 trainable), 172,288 elements"
    table = lines[3:]
    expected = _gpt2_expected()
    assert len(table) == 2 + len(expected)  # one line per tensor: nothing wrapped, nothing elided
    cells = aligned_cells(table, right={3})
    assert cells[0] == ["parameter", "aliases", "shape", "numel", "decay", "l1", "l2", "set by (line)"]
    assert [tuple(c) for c in cells[1:]] == expected
    # The longest name sets the first column's width; every row starts with its full name.
    assert table_columns(table)[0] == (0, len("transformer.h.0.attn.c_attn.weight"))
    for line, row in zip(table[2:], expected):
        assert line.startswith(row[0] + " ")


def test_a_model_file_whose_factory_imports_its_neighbours_inside(tmp_path: Path) -> None:
    # Before, the file's directory left sys.path once the file was imported, before the factory ran:
    # "No module named 'helper'", where `python sub/model.py` finds it.
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "helper.py").write_text("from torch import nn\n\nclass Block(nn.Linear):\n    def __init__(self):\n        super().__init__(3, 2)\n")
    (sub / "model.py").write_text("def make():\n    from helper import Block\n    return Block()\n")
    rules = tmp_path / "rules.reg"
    rules.write_text("all l2 0.1\n")
    done = run("check", str(rules), "--model", f"{sub / 'model.py'}:make", cwd=tmp_path)
    assert done.returncode == 0 and "All checks passed" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("fmt", ["text", "github"])
def test_a_reader_that_stops_early_ends_the_output_quietly(tmp_path: Path, fmt: str) -> None:
    # `regdsl check ... | head -1`: before, a BrokenPipeError traceback on stderr.
    rules = tmp_path / "many.reg"
    rules.write_text("".join(f"layer nothing{k}.** l2 0.1\n" for k in range(3000)))
    proc = subprocess.Popen(
        [*entry_point(), "check", str(rules), "--model", "examples/train.py:Classifier", "--format", fmt],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 2
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_explain_csv_says_it_leaves_the_activity_terms_out() -> None:
    # Before, the CSV had no trace of them and nothing said so.
    done = run("explain", "examples/cnn.reg", "--model", "examples/train_cnn.py:SmallCNN", "--format", "csv")
    assert done.returncode == 0
    assert "activity" not in done.stdout
    assert "regdsl: note: the CSV lists parameters; the activity terms of 1 module (act2) are not in it" in done.stderr
    quiet = run("explain", "examples/rules.reg", "--model", "examples/train.py:Classifier", "--format", "csv")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_a_file_named_twice_is_checked_and_formatted_once(tmp_path: Path) -> None:
    rules = tmp_path / "f.reg"
    rules.write_text("all  l2 0.1\n")
    done = run("fmt", str(rules), str(tmp_path / ".." / tmp_path.name / "f.reg"))
    assert done.returncode == 0 and "1 file reformatted, 0 left unchanged." in done.stdout, done.stdout
    rules.write_text("all l2 0.1\nlayer nothing l2 1\n")
    done = run("check", str(rules), str(rules), "--model", "examples/train.py:Classifier")
    assert done.stdout.count("error: RD101") == 1, done.stdout
