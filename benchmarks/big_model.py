"""A model too large to run comfortably here, reported by ``retrofit add-se`` in seconds and with a
peak memory well under the size of its weights: with nothing to save, load or time, add-se builds the
model on the meta device (``--meta``, the default then), so no weight is ever allocated.

For each model: the whole process's wall time and peak resident memory, next to its float32 weight
size and to a process that only imports timm (the interpreter, torch and timm alone), measured in the
same run; and the same command with ``--no-meta`` (real weights) for the smaller model.

Run: python benchmarks/big_model.py [--runs N]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, RETROFIT, med, processes, spread  # noqa: E402

MODELS = [("resnext101_32x32d", "3,320,320"), ("resnet200d", "3,320,320")]


def weights(model: str, size: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run(
            RETROFIT + ["add-se", model, "--input-size", size, "--json", str(out)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return json.loads(out.read_text())["base"]["params"] * 4


def main(runs: int) -> None:
    cmds = {"import timm": [PYTHON, "-c", "import timm"]}
    for model, size in MODELS:
        cmds[f"add-se {model} {size}"] = RETROFIT + ["add-se", model, "--input-size", size]
    small, small_size = MODELS[-1]
    cmds[f"add-se {small} {small_size} --no-meta"] = RETROFIT + [
        "add-se",
        small,
        "--input-size",
        small_size,
        "--no-meta",
    ]
    times, cpu, peak = processes(cmds, runs)
    print(f"whole processes, {runs} rounds in turns (peak = largest resident memory of a round):")
    for name in cmds:
        print(
            f"  {name:48s} wall {spread(times[name])}, CPU median {med(cpu[name]):.1f} s, "
            f"peak {peak[name] / 2**20:.0f} MiB"
        )
    base = peak["import timm"]
    for model, size in MODELS:
        name = f"add-se {model} {size}"
        w = weights(model, size)
        print(
            f"  {model}: float32 weights {w / 2**20:.0f} MiB; add-se peak {peak[name] / 2**20:.0f} MiB = "
            f"{peak[name] / w:.2f} of the weights ({(peak[name] - base) / 2**20:+.0f} MiB over importing timm); "
            f"{med(times[name]):.1f} s, {med(times[name]) - med(times['import timm']):+.1f} s over importing timm"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    main(parser.parse_args().runs)
