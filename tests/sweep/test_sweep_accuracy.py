"""The accuracy sweep (issue 9, point 1): each row is what `retrofit finetune` gives for that recipe and
seed, bitwise; the control arms train on the same images in the same order for as many steps; a
failed combination is a row with its reason."""

import importlib
import json
import statistics

import pytest
import torch
from safetensors.torch import save_model
from typer.testing import CliRunner

import retrofit
from retrofit import RetrofitError
from retrofit.cli import app
from support import SIZE, five_class_model, make_folder, plain_model

runner = CliRunner()
run_module = importlib.import_module("retrofit.train.run")  # the loop a fine-tune calls
ablation_module = importlib.import_module("retrofit.sweep.ablation")  # `retrofit.sweep` is also the function
EPOCHS, SEEDS, RATIOS = 2, (0, 1), (4, 8)
TRAIN = ["--epochs", str(EPOCHS), "-b", "8", "--lr", "1e-2", "-j", "0"]


class Recorder:
    """Wraps the training loop: per run (one model object), the batches it trained on."""

    def __init__(self, monkeypatch):
        self.runs: list[tuple[object, list]] = []
        real = run_module.train_epoch

        def recording(net, model, loader, optimizer, **kw):
            if not self.runs or self.runs[-1][0] is not model:
                self.runs.append((model, []))  # the model is kept: its id cannot be reused
            return real(net, model, _Logged(loader, self.runs[-1][1]), optimizer, **kw)

        monkeypatch.setattr(run_module, "train_epoch", recording)


class _Logged:
    def __init__(self, loader, log):
        self.loader, self.log = loader, log

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # the loop reads the loader's batch_sampler (each step's image count)
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            self.log.append((batch.targets.tolist(), batch.images.double().sum().item()))
            yield batch


def test_rows_are_finetune_runs_and_the_controls_see_the_same_batches(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    save_model(five_class_model(), str(tmp_path / "plain.safetensors"))
    recorder = Recorder(monkeypatch)
    result = runner.invoke(
        app,
        [
            "sweep",
            "test_resnet",
            "--checkpoint",
            str(tmp_path / "plain.safetensors"),
            "--num-classes",
            "5",
            "--input-size",
            f"3,{SIZE},{SIZE}",
            "--r",
            ",".join(map(str, RATIOS)),
            "--data",
            str(root),
            "--seeds",
            str(len(SEEDS)),
            *TRAIN,
            "--json",
            "-",
        ],
    )
    assert result.exit_code == 0, result.output
    swept = json.loads(result.stdout)
    rows = swept["rows"]
    assert [(r["arm"], r["r"]) for r in rows] == [("original", 0), ("head+norms", 0), ("full", 0), ("se", 4), ("se", 8)]
    runs = [log for _, log in recorder.runs]
    assert len(runs) == 4 * len(SEEDS)  # 2 controls + 2 combinations, each once per seed
    steps = 3 * EPOCHS  # 24 images, batches of 8
    by_seed = {s: [runs[i] for i in range(len(runs)) if i % len(SEEDS) == k] for k, s in enumerate(SEEDS)}
    for seed, logs in by_seed.items():
        assert all(len(log) == steps for log in logs)
        assert all(log == logs[0] for log in logs), f"seed {seed}: an arm saw other batches"
    assert by_seed[0][0] != by_seed[1][0]  # the seed does change the order and augmentation
    monkeypatch.undo()

    for r, row in zip(RATIOS, rows[3:]):
        for i, seed in enumerate(SEEDS):
            plain = five_class_model()
            torch.manual_seed(seed)  # the blocks of seed s: documented in retrofit.sweep.ablation
            se = retrofit.add_se(plain, r=r, input_size=(3, SIZE, SIZE))
            ckpt = retrofit.save(se, tmp_path / f"se{r}-{seed}.safetensors")
            out = tmp_path / f"run{r}-{seed}"
            done = runner.invoke(
                app, ["finetune", str(ckpt), "--data", str(root), *TRAIN, "--seed", str(seed), "--output-dir", str(out)]
            )
            assert done.exit_code == 0, done.output
            metrics = {m["name"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
            last = metrics[f"epoch {EPOCHS}"]
            assert row["top1_per_seed"][i] == last["top1"] and row["val_loss_per_seed"][i] == last["val_loss"]
            assert rows[0]["top1_per_seed"][i] == metrics["original"]["top1"]  # control: the original at step 0
            assert rows[0]["val_loss_per_seed"][i] == metrics["original"]["val_loss"]

    best = max(rows[:3], key=lambda c: c["top1"])
    for row in rows:
        assert row["top1"] == pytest.approx(statistics.fmean(row["top1_per_seed"]))
        assert row["top1_std"] == pytest.approx(statistics.stdev(row["top1_per_seed"]))
        if row["arm"] == "se":
            diffs = [a - b for a, b in zip(row["top1_per_seed"], best["top1_per_seed"])]
            assert row["control"] == best["arm"] and row["delta_top1"] == pytest.approx(statistics.fmean(diffs))
            half = 12.706 * statistics.stdev(diffs) / 2**0.5  # t(0.975, 1 df): two seeds
            assert row["delta_top1_ci"] == pytest.approx(
                [statistics.fmean(diffs) - half, statistics.fmean(diffs) + half]
            )
        dominated = any(
            o["params"] <= row["params"]
            and o["top1"] >= row["top1"]
            and (o["params"] < row["params"] or o["top1"] > row["top1"])
            for o in rows
        )
        assert row["pareto"] == (not dominated)
    se = [r for r in rows if r["arm"] == "se"]
    beat = [r for r in se if r["delta_top1_ci"][0] > 0]
    top = max(beat or se, key=lambda r: (r["delta_top1"], -r["params"]))  # a tie: the cheaper recipe
    words = "beat the control" if beat else f"no recipe beat the control '{best['arm']}' on this data: best"
    assert words in swept["verdict"] and f"r={top['r_label']}" in swept["verdict"]
    assert f"Δ top-1 {top['delta_top1']:+.2f} points" in swept["verdict"]


def test_a_failed_combination_is_a_row(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", train=4, val=2)
    real = ablation_module.finetune

    def fails_for_r8(model, *args, **kwargs):
        info = retrofit.get_info(model)
        if info is not None and info.recipe.r == 8:
            raise RetrofitError("loss is nan")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ablation_module, "finetune", fails_for_r8)
    lines = []
    rows = retrofit.sweep(
        plain_model(),
        r=[4, 8],
        position=["standard", "pre"],
        input_size=(3, SIZE, SIZE),
        data=root,
        epochs=1,
        seeds=1,
        batch_size=4,
        lr=1e-2,
        workers=0,
        on_event=lambda e: lines.append(e.message),
    )
    by = {(r.arm, r.position, r.r): r for r in rows}
    assert by["se", "standard", 8].note == "fine-tune failed: loss is nan" and by["se", "standard", 8].top1 is None
    assert by["se", "pre", 8].top1 is None and by["se", "standard", 4].top1 is not None
    assert by["se", "pre", 4].top1 is not None  # the sweep went on after the failure
    assert all(by[c, "", 0].top1 is not None for c in ("original", "head+norms", "full"))
    assert len(lines) == 2 + 4 and "failed (loss is nan)" in lines[3]
    with pytest.raises(RetrofitError, match="sets phase2_epochs itself"):
        retrofit.sweep(plain_model(), input_size=(3, SIZE, SIZE), data=root, phase2_epochs=3)
