"""benchmarks/gpu.py, the GPU check, runs on CPU (``--device cpu --small``): every row of its table is
there with a positive, finite number, and bad input is one error line. No timing is judged here."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"

# the rows a run must print, written out here (not read from the script), so that a row it drops fails
ARMS = ("phase 1 (SE blocks only)", "phase 2 (retrofit, everything)", "full fine-tune (plain model)")
FORMATS = ("contiguous", "channels_last")
ROWS = (
    [f"train, {arm}, {fmt}" for fmt in FORMATS for arm in ARMS]
    + [f"train, phase 1 / full fine-tune, {fmt}" for fmt in FORMATS]
    + [f"train, channels_last / contiguous, {arm}" for arm in ARMS]
    + [f"memory, one training round, {arm}, {fmt}" for fmt in FORMATS for arm in ARMS]
    + [f"memory, phase 1 / full fine-tune, {fmt}" for fmt in FORMATS]
    + [
        f"latency, {name}, {mode}, {fmt}"
        for mode in ("eager", "compile")
        for fmt in FORMATS
        for name in ("seresnet18", "retrofit")
    ]
    + [f"latency, retrofit / seresnet18, {mode}, {fmt}" for mode in ("eager", "compile") for fmt in FORMATS]
    + [f"latency, channels_last / contiguous, retrofit, {mode}" for mode in ("eager", "compile")]
    + [f"latency, compile / eager, retrofit, {fmt}" for fmt in FORMATS]
    + ["gloo all_reduce 4 MiB, spawned group of 1", "memory, whole run's peak"]
)


def problems(output: str) -> list[str]:
    """What is wrong with a run's output: a missing or repeated row, a value that is not a positive
    finite number, a missing header or footer fact."""
    values: dict[str, list[str]] = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("what", "---"):
            values.setdefault(cells[0], []).append(cells[1])
    found = []
    for row in ROWS:
        got = values.pop(row, [])
        if len(got) != 1:
            found.append(f"{row}: {len(got)} rows")
            continue
        try:
            number = float(got[0])
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            found.append(f"{row}: {got[0]!r} is not a positive finite number")
    found += [f"unexpected row {row!r}" for row in values]
    header = output.splitlines()[0] if output else ""
    for fact in (
        f"torch {torch.__version__}",
        "timm ",
        "batch 4, 64x64",
        "float32",
        "CPU",
        re.compile(r"\d{4}-\d\d-\d\d"),
    ):
        if not (fact.search(header) if isinstance(fact, re.Pattern) else fact in header):
            found.append(f"header lacks {fact}")
    if not re.search(r"^took \d+\.\d s of a 420 s budget$", output, flags=re.M):
        found.append("no line 'took N s of a 420 s budget' (or a check failed)")
    return found


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cpu_small_run_prints_every_row_with_a_positive_finite_number():
    result = run("--device", "cpu", "--small")  # the default budget: --small caps its rounds
    assert result.returncode == 0, result.stdout + result.stderr
    assert problems(result.stdout) == [], result.stdout
    # the checker itself can fail: a row gone, a NaN, a negative value, a failed check
    lines = result.stdout.splitlines()
    gone = "\n".join(ln for ln in lines if not ln.startswith("| gloo all_reduce"))
    assert problems(gone) == ["gloo all_reduce 4 MiB, spawned group of 1: 0 rows"]
    nan = re.sub(
        r"^(\| latency, retrofit / seresnet18, eager, contiguous \| )[^|]+", r"\1nan ", result.stdout, flags=re.M
    )
    assert problems(nan) == ["latency, retrofit / seresnet18, eager, contiguous: 'nan' is not a positive finite number"]
    negative = re.sub(r"^(\| memory, whole run's peak \| )[^|]+", r"\1-3.0 ", result.stdout, flags=re.M)
    assert problems(negative) == ["memory, whole run's peak: '-3.0' is not a positive finite number"]
    failed = re.sub(r"^took .*$", "took 9.0 s of a 420 s budget; FAILED: x", result.stdout, flags=re.M)
    assert len(problems(failed)) == 1


@pytest.fixture
def script(monkeypatch):
    """benchmarks/gpu.py as a module of this process; the entries it adds to sys.path and sys.modules
    (itself, and benchmarks/common.py as ``common``) are taken off afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    had = {name: sys.modules[name] for name in ("common",) if name in sys.modules}
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks its module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("common", None)
    sys.modules.update(had)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--device", "tpu7"], ["unknown device 'tpu7'"]),
        (["--device", "meta"], ["runs on cpu or cuda"]),
        (["--device", "cpu", "--budget-s", "0"], ["--budget-s must be positive"]),
        (["--device", "cpu", "--batch", "0"], ["--batch must be at least 1"]),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], ["no GPU", "--device cpu --small"])]),
)
def test_bad_input_is_one_error_line(args, words, script, capsys):
    with pytest.raises(SystemExit) as exit:
        script.main(args)
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and out == "", (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_bad_input_from_the_command_line_has_no_traceback():
    result = run("--device", "tpu7")
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.strip().splitlines() == ["error: unknown device 'tpu7': use cpu, cuda or cuda:N"]
