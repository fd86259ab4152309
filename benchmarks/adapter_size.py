"""Adapter files against full files: bytes on disk (exact, not timings), and the time to hash a base.

For each model and recipe: a full retrofitted file (``retrofit.save``) and an adapter
(``retrofit.save(..., adapter=True)``) of the same model right after ``add_se`` (only the blocks
differ from the base), written to a temporary folder; then the seconds ``retrofit.load(adapter,
base=...)`` takes over ``retrofit.load(full)`` (it builds the base from its file and hashes it). The sizes
do not depend on the machine; the times do (medians of a few runs, measured on whatever else runs).

Run: python benchmarks/adapter_size.py [--runs N]
"""

import argparse
import tempfile
import time
from pathlib import Path
from statistics import median

CASES = [
    ("resnet18", {}),
    ("resnet50", {}),
    ("resnet50", {"module": "eca"}),
    ("resnet50", {"position": "inside"}),
    ("resnet101", {}),
]


def main() -> None:
    import timm
    from safetensors.torch import save_file

    import retrofit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    print(
        f"{'model':10s} {'recipe':40s} {'full bytes':>12s} {'adapter bytes':>14s} {'adapter %':>10s} "
        f"{'load full s':>12s} {'load adapter s':>15s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, fields in CASES:
            plain = timm.create_model(name)
            base = tmp / f"{name}.safetensors"
            save_file(plain.state_dict(), str(base))
            se = retrofit.add_se(plain, **{"position": "standard", "r": 16, **fields})
            full = retrofit.save(se, tmp / "full.safetensors").stat().st_size
            adapter_path = retrofit.save(se, tmp / "adapter.safetensors", adapter=True)
            adapter = adapter_path.stat().st_size
            times = {"full": [], "adapter": []}
            for _ in range(runs):
                for kind, load in (
                    ("full", lambda: retrofit.load(tmp / "full.safetensors")),
                    ("adapter", lambda: retrofit.load(adapter_path, base=base)),  # noqa: B023
                ):
                    start = time.perf_counter()
                    load()
                    times[kind].append(time.perf_counter() - start)
            recipe = ", ".join(f"{k} {v}" for k, v in {"position": "standard", "r": 16, **fields}.items())
            print(
                f"{name:10s} {recipe:40s} {full:12,d} {adapter:14,d} {100 * adapter / full:9.2f}% "
                f"{median(times['full']):12.2f} {median(times['adapter']):15.2f}"
            )


if __name__ == "__main__":
    main()
