"""The same fine-tuning command under a real 2-process torchrun (gloo on CPU) against one process."""

import json
import os
import subprocess
import sys

import pytest

import retrofit
from support import CLASSES, make_folder, se_model


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_torchrun_two_processes_equal_one(tmp_path):
    # 27 train images in batches of 8: the last step has 3, 2 on rank 0 and 1 on rank 1 (each image must
    # weigh as in one process); 15 val images: not divisible by 2 processes
    data = make_folder(tmp_path / "data", train=9, val=5)
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    settings = ["--epochs", "1", "-b", "8", "--lr", "0.01", "-j", "0", "--no-augment", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "retrofit",
        "finetune",
        str(ckpt),
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "two"),
        *settings,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("Fine-tuning results") == 1  # rank 0 prints, rank 1 does not
    one = retrofit.finetune(
        retrofit.load(ckpt),
        data,
        epochs=1,
        batch_size=8,
        lr=0.01,
        workers=0,
        augment=False,
        device="cpu",
        output_dir=tmp_path / "one",
    )
    two = rows(tmp_path / "two" / "metrics.jsonl")
    assert [r["name"] for r in two] == [r["name"] for r in one.rows] == ["original", "step 0", "epoch 1"]
    n = CLASSES * 5
    for a, b in zip(one.rows, two):
        assert a["val_images"] == b["val_images"] == n  # every image once: no padding by the sampler
        assert abs(a["top1"] - b["top1"]) <= 100 / n + 1e-9 and abs(a["top5"] - b["top5"]) <= 100 / n + 1e-9
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    assert two[-1]["train_images"] == one.rows[-1]["train_images"] == 27
    assert two[-1]["train_loss"] == pytest.approx(one.rows[-1]["train_loss"], rel=1e-4)
    assert two[0]["top1"] == one.rows[0]["top1"]  # before any training: the same counts exactly


def test_torchrun_accuracy_sweep_equals_one_process(tmp_path):
    """`retrofit sweep --data` under a real 2-process torchrun: each run is DDP over both processes, so
    every arm whose norms keep their running statistics (the original, head+norms, the phase-1 SE arms)
    gives one process's numbers to float rounding; only rank 0 prints and writes the JSON. `-r`, not
    `--r`: torchrun's own parser reads `--r` as an ambiguous abbreviation of its options."""
    from safetensors.torch import save_model

    from support import five_class_model

    data = make_folder(tmp_path / "data")
    save_model(five_class_model(), str(tmp_path / "plain.safetensors"))
    args = [
        "sweep",
        "test_resnet",
        "--checkpoint",
        str(tmp_path / "plain.safetensors"),
        "--num-classes",
        "5",
        "--input-size",
        "3,32,32",
        "-r",
        "4,8",
        "--data",
        str(data),
        "--seeds",
        "2",
        "--epochs",
        "1",
        "-b",
        "8",
        "--lr",
        "1e-2",
        "-j",
        "0",
        "--no-augment",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "retrofit",
            *args,
            "--json",
            str(tmp_path / "two.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("Sweep") == 1 and two.stderr.count("[1/8]") == 1  # rank 0 alone reports
    one = subprocess.run(
        [sys.executable, "-m", "retrofit", *args, "--json", str(tmp_path / "one.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["rows"] for n in ("one", "two"))
    assert (
        [(r["arm"], r["r"]) for r in a]
        == [(r["arm"], r["r"]) for r in b]
        == [("original", 0), ("head+norms", 0), ("full", 0), ("se", 4), ("se", 8)]
    )
    for x, y in zip(a, b):
        if x["arm"] == "full":  # trains BatchNorm statistics per process, as `finetune` does
            continue
        assert x["top1_per_seed"] == y["top1_per_seed"], x["arm"]
        assert y["val_loss_per_seed"] == pytest.approx(x["val_loss_per_seed"], rel=1e-5), x["arm"]


def test_a_process_that_dies_ends_the_others_with_one_error_line_and_resume_finishes(tmp_path):
    """Rank 1 of a 2-process fine-tune killed after an epoch: rank 0 printed `internal error: RuntimeError:
    [gloo] ... Connection closed by peer`. It must say what happened in one line; the run folder holds the
    committed epochs, and the same command with --resume (two processes again) finishes the run."""
    import signal
    import time

    from support import start_ranks

    data = make_folder(tmp_path / "data")
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "retrofit",
        "finetune",
        str(ckpt),
        "--data",
        str(data),
        "--output-dir",
        str(run),
        "--epochs",
        "12",
        "-b",
        "8",
        "--lr",
        "0.01",
        "-j",
        "0",
        "--no-augment",
        "--device",
        "cpu",
    ]
    ranks = start_ranks(cmd, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and ranks[0].poll() is None:
        if (run / "metrics.jsonl").is_file() and '"epoch 1"' in (run / "metrics.jsonl").read_text():
            break
        time.sleep(0.02)
    ranks[1].send_signal(signal.SIGKILL)
    out, err = ranks[0].communicate(timeout=120)
    ranks[1].communicate(timeout=60)
    committed = [r["name"] for r in rows(run / "metrics.jsonl")]
    assert "epoch 12" not in committed, "the run ended before rank 1 was killed"
    assert ranks[0].returncode == 2, err[-3000:]
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert (
        len(errors) == 1
        and errors[0].startswith("error: another process of this torchrun job died (")
        and (
            errors[0].endswith(
                f"); {run} holds the epochs finished before it: the same command with --resume continues"
            )
        )
    ), err[-3000:]
    assert "Traceback" not in err + out
    again = start_ranks([*cmd, "--resume"], cwd=tmp_path)
    done = [r.communicate(timeout=300) for r in again]
    assert [r.returncode for r in again] == [0, 0], done[0][1][-3000:]
    names = [r["name"] for r in rows(run / "metrics.jsonl")]
    assert names == ["original", "step 0", *[f"epoch {i}" for i in range(1, 13)]]  # each epoch once, in order
    retrofit.load(run / "last.safetensors")
