"""The fine-tuning stage on a tiny ImageFolder: learning, a frozen backbone, resume, files, bad input."""

import copy
import errno
import hashlib
import logging
import warnings

import pytest
import timm
import torch
import torchvision
from conftest import randomize
from safetensors.torch import load_file
from typer.testing import CliRunner

import retrofit
from retrofit import RetrofitError, RetrofitWarning
from retrofit.cli import app
from support import CLASSES, FAST, SIZE, make_folder, one_error_line, plain_model, reference_top1, se_model

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_phase1_learns_and_keeps_the_backbone_bitwise(data):
    """Every parameter of every inserted block moves in phase 1 (on a backbone whose branch norms are
    not zero: issue 17, item 1), and nothing else does; no tensor is said to get no gradient."""
    plain = plain_model()
    se = se_model(plain)
    before = {k: v.clone() for k, v in se.state_dict().items()}
    se_keys = {k for b in retrofit.get_info(se).blocks for k in before if k.startswith(b.path + ".")}
    assert len(se_keys) == 4 * len(retrofit.get_info(se).blocks) == 16  # fc1 and fc2, weight and bias, in each of 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", RetrofitWarning)
        result = retrofit.finetune(se, data, epochs=2, augment=False, restore_best=False, **FAST)
    rows = {r["name"]: r for r in result.rows}
    # the original (blocks bypassed) against an independent evaluation of the plain network
    assert rows["original"]["top1"] == pytest.approx(reference_top1(plain, data))
    assert rows["original"]["val_images"] == CLASSES * 4
    # preserving init: step 0 computes exactly what the original did
    assert rows["step 0"]["val_loss"] == rows["original"]["val_loss"]
    assert rows["epoch 2"]["val_loss"] < rows["step 0"]["val_loss"]
    assert rows["epoch 2"]["train_loss"] < rows["epoch 1"]["train_loss"]
    after = se.state_dict()
    for k, v in before.items():
        if k in se_keys:
            assert not torch.equal(after[k], v), f"{k} did not train in phase 1"
        else:
            assert torch.equal(after[k], v), f"{k} changed in phase 1"


def test_phase2_moves_the_backbone_and_best_is_restored(data):
    se = se_model()
    before = {k: v.clone() for k, v in se.state_dict().items()}
    result = retrofit.finetune(se, data, epochs=1, phase2_epochs=1, augment=False, **FAST)
    assert [r["phase"] for r in result.rows] == [0, 0, 1, 2]
    assert result.rows[-1]["lr"] == pytest.approx(FAST["lr"] / 10)
    best = result.best
    assert best["top1"] == max(r["top1"] for r in result.rows[1:])
    changed = [k for k, v in se.state_dict().items() if not torch.equal(v, before[k])]
    if best["name"] == "step 0":
        assert not changed
    else:
        assert any("conv1" in k or "bn1" in k for k in changed)  # the backbone trained in phase 2


def test_a_model_that_reads_its_state_dict_version_gets_its_best_weights_back(data, tmp_path):
    """torchvision's MNASNet refuses a state dict without ``_metadata`` (its version); the best weights
    kept in memory are a copy, and the file has none (issue 17, item 2). The reference: best.safetensors,
    loaded on a fresh network."""
    torch.manual_seed(0)
    plain = randomize(torchvision.models.mnasnet0_5(num_classes=CLASSES))
    se = retrofit.add_se(plain, input_size=(3, SIZE, SIZE))
    retrofit.finetune(se, data, epochs=1, augment=False, output_dir=tmp_path / "run", **FAST)
    best = retrofit.load(tmp_path / "run" / "best.safetensors", base=torchvision.models.mnasnet0_5(num_classes=CLASSES))
    assert all(torch.equal(v, best.state_dict()[k]) for k, v in se.state_dict().items())


def test_output_folders_are_created_as_mkdir_p_makes_them(tmp_path, monkeypatch):
    """Issue 17, item 7: output_dir="runs/se50" in a fresh checkout was refused ('output folder runs does
    not exist'), and so was retrofit.save into a new folder. A folder under a regular file is one error."""
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data")
    se = se_model()
    retrofit.finetune(se, data="data/", epochs=1, output_dir="runs/se50", **FAST)
    assert {p.name for p in (tmp_path / "runs" / "se50").iterdir()} >= {
        "best.safetensors",
        "last.safetensors",
        "metrics.jsonl",
        "train_state.pt",
    }
    retrofit.save(se, "out/sub/se.safetensors")
    assert torch.equal(retrofit.load("out/sub/se.safetensors").state_dict()["fc.weight"], se.state_dict()["fc.weight"])
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(RetrofitError, match="cannot create the output folder afile/run"):
        retrofit.finetune(se, data="data/", epochs=1, output_dir="afile/run", **FAST)
    with pytest.raises(RetrofitError, match="cannot create the output folder afile/sub: afile is a file"):
        retrofit.save(se, "afile/sub/se.safetensors")


def test_resume_after_a_kill_gives_the_same_weights(data, tmp_path, monkeypatch):
    opts = dict(epochs=2, augment=True, restore_best=False, **FAST)  # killed in epoch 2: optimizer state resumes
    start = se_model()  # one input for every run (its fc2 init draws from the global RNG)
    retrofit.finetune(copy.deepcopy(start), data, output_dir=tmp_path / "a", **opts)
    from retrofit.train.run import Run as _Run

    calls = {"n": 0}
    real = _Run._train_epoch

    def dies_in_epoch_2(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed in the middle of the run
        return real(self, *args)

    monkeypatch.setattr(_Run, "_train_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        retrofit.finetune(copy.deepcopy(start), data, output_dir=tmp_path / "b", **opts)
    monkeypatch.setattr(_Run, "_train_epoch", real)
    assert torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)["epoch"] == 1
    resumed = retrofit.finetune(copy.deepcopy(start), data, output_dir=tmp_path / "b", resume=True, **opts)
    a, b = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    assert len(resumed.rows) == 4
    assert not list((tmp_path / "b").glob(".*tmp"))


def test_cli_finetune_keeps_the_input_and_saves_the_best(data, tmp_path):
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    digest = sha(ckpt)
    out = tmp_path / "run"
    args = ["finetune", str(ckpt), "--data", str(data), "--epochs", "1", "-b", "8", "-j", "0", "--output-dir", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Fine-tuning results" in result.output and "original (no SE)" in result.output
    assert sha(ckpt) == digest
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [line.split('"name": "')[1].split('"')[0] for line in lines] == ["original", "step 0", "epoch 1"]
    best = retrofit.load(out / "best.safetensors")
    assert retrofit.get_info(best).recipe.r == 4
    again = runner.invoke(app, args)  # a second run must not clobber the first
    assert again.exit_code == 2 and "already holds a fine-tuning run" in again.output
    done = runner.invoke(app, args + ["--resume"])  # nothing left to do: the same table again
    assert done.exit_code == 0 and "epoch 1" in done.output
    clash = runner.invoke(
        app, ["finetune", str(out / "best.safetensors"), "--data", str(data), "--output-dir", str(out)]
    )
    assert clash.exit_code == 2 and "never overwritten" in clash.output


def test_add_se_finetune(data, tmp_path):
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_model

    save_model(plain_model(), str(plain))
    digest = sha(plain)
    out = tmp_path / "se.safetensors"
    big = make_folder(tmp_path / "d", train=11, val=2)  # add-se fine-tunes with the default batch of 32
    result = runner.invoke(
        app,
        [
            "add-se",
            "test_resnet",
            "--checkpoint",
            str(plain),
            "--input-size",
            f"3,{SIZE},{SIZE}",
            "--num-classes",
            "3",
            "--r",
            "4",
            "--finetune",
            str(big),
            "--epochs",
            "1",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Overhead" in result.output and "Fine-tuning results" in result.output
    assert sha(plain) == digest and (tmp_path / "se-add-se" / "train_state.pt").is_file()
    assert retrofit.get_info(retrofit.load(out)).recipe.r == 4
    missing = runner.invoke(app, ["add-se", "test_resnet", "--finetune", str(data)])
    assert missing.exit_code == 2 and "--finetune needs --output" in missing.output


def test_bad_data_folders(tmp_path):
    se = se_model()
    with pytest.raises(RetrofitError, match="data folder .* not found"):
        retrofit.finetune(se, tmp_path / "nothing", **FAST)
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    with pytest.raises(RetrofitError, match="no images in .*train"):
        retrofit.finetune(se, tmp_path / "empty", **FAST)
    (tmp_path / "noval" / "train").mkdir(parents=True)
    with pytest.raises(RetrofitError, match="has no val/ folder"):
        retrofit.finetune(se, tmp_path / "noval", **FAST)
    odd = make_folder(tmp_path / "odd", train=1, val=1)
    (odd / "val" / "class2").rename(odd / "val" / "class9")
    with pytest.raises(RetrofitError, match=r"different classes \(only in train: class2; only in val: class9\)"):
        retrofit.finetune(se, odd, **FAST)
    ckpt = retrofit.save(se, tmp_path / "se.safetensors")
    line = one_error_line(runner.invoke(app, ["finetune", str(ckpt), "--data", str(tmp_path / "nothing")]))
    assert "not found" in line


def test_undecodable_images_are_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "train" / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (root / "val" / "class1" / "broken.png").write_bytes(b"GIF89a garbage")
    with pytest.warns(RetrofitWarning, match="cannot decode") as caught:
        result = retrofit.finetune(se_model(), root, epochs=1, batch_size=5, workers=0)
    assert {str(w.message).split(":")[0] for w in caught} == {
        f"skipped {root / 'train' / 'class0' / 'broken.png'}",
        f"skipped {root / 'val' / 'class1' / 'broken.png'}",
    }
    assert result.row("step 0")["val_images"] == CLASSES * 4
    assert result.row("step 0")["skipped_images"] == 1
    assert result.skipped_images == 2  # one in train/, one in val/, in the last epoch's passes


def test_resume_refuses_another_model_and_a_damaged_state(data, tmp_path):
    import shutil

    retrofit.finetune(se_model(), data, epochs=1, output_dir=tmp_path / "run", **FAST)
    state = tmp_path / "run" / "train_state.pt"
    with pytest.raises(RetrofitError, match="from another model \\(recipe"):
        retrofit.finetune(se_model(r=8), data, epochs=1, output_dir=tmp_path / "run", resume=True, **FAST)
    with pytest.raises(RetrofitError, match="started with epochs = 1, now 2"):
        retrofit.finetune(se_model(), data, epochs=2, output_dir=tmp_path / "run", resume=True, **FAST)
    other = retrofit.save(
        retrofit.add_se(timm.create_model("resnet18", num_classes=CLASSES), input_size=(3, SIZE, SIZE)),
        tmp_path / "r18.safetensors",
    )
    (tmp_path / "r18-finetune").mkdir()
    shutil.copy(state, tmp_path / "r18-finetune" / "train_state.pt")
    line = one_error_line(runner.invoke(app, ["finetune", str(other), "--data", str(data), "--resume"]))
    assert "is from another model (architecture 'test_resnet'" in line
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(RetrofitError, match="cannot read .*not a complete training checkpoint"):
        retrofit.finetune(se_model(), data, epochs=1, output_dir=tmp_path / "run", resume=True, **FAST)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00" * 64)
    line = one_error_line(runner.invoke(app, ["finetune", str(damaged), "--data", str(data)]))
    assert "cannot read" in line


def test_full_disk_loses_nothing(data, tmp_path, monkeypatch):
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    out = tmp_path / "run"
    import retrofit.train.state as ts

    real, calls = ts.torch.save, {"n": 0}

    def full_after_first(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:
            f.write(b"PK\x03\x04partial")  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ts.torch, "save", full_after_first)
    result = runner.invoke(
        app,
        ["finetune", str(ckpt), "--data", str(data), "--epochs", "2", "-b", "8", "-j", "0", "--output-dir", str(out)],
    )
    line = one_error_line(result)
    assert "No space left on device" in line and "previous train_state.pt is kept" in line
    monkeypatch.setattr(ts.torch, "save", real)
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 1
    assert not list(out.glob(".*tmp"))
    resumed = runner.invoke(
        app,
        [
            "finetune",
            str(ckpt),
            "--data",
            str(data),
            "--epochs",
            "2",
            "-b",
            "8",
            "-j",
            "0",
            "--output-dir",
            str(out),
            "--resume",
        ],
    )
    assert resumed.exit_code == 0, resumed.output
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 2


def test_other_number_of_classes_gets_a_new_head_that_trains(data, tmp_path):
    se = se_model(randomize(timm.create_model("test_resnet", num_classes=5)))
    before = {k: v.clone() for k, v in se.state_dict().items() if not k.startswith("fc.")}
    fresh = copy.deepcopy(se)
    torch.manual_seed(0)  # the seed the run gives its new head
    fresh.reset_classifier(CLASSES)
    result = retrofit.finetune(se, data, epochs=1, output_dir=tmp_path / "run", restore_best=False, **FAST)
    assert not torch.equal(se.get_classifier().weight, fresh.get_classifier().weight)  # the head trained
    assert se.num_classes == CLASSES and se.get_classifier().out_features == CLASSES
    after = se.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if ".se." not in k)  # backbone frozen
    assert result.row("epoch 1")["train_loss"] is not None
    again = retrofit.load(tmp_path / "run" / "last.safetensors")  # rebuilt with the new head's size
    assert again.num_classes == CLASSES
    assert torch.equal(again.state_dict()["fc.weight"], after["fc.weight"])


@pytest.mark.parametrize("position", ["standard", "post"])
def test_bypassed_blocks_give_the_original_network(position):
    """The "original" row is the retrofitted model with its blocks bypassed; with random (paper) blocks,
    bypassed, it must compute what the plain model computes, fused standard blocks (x * s + shortcut)
    included."""
    from retrofit import bypass as bypass_se

    plain = plain_model().eval()
    model = se_model(plain, position=position, init="paper").eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert not torch.equal(model(x), plain(x))  # the blocks do change the function
        with bypass_se(model):
            assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize(
    "entry, edit",
    [
        ("ema", lambda s: s["ema"]["module"].pop(next(iter(s["ema"]["module"])))),  # a missing tensor
        ("ema", lambda s: s["ema"].update(steps="many")),  # not a count
        ("ema", lambda s: s.update(ema=[1, 2])),  # not a mapping
        ("teacher", lambda s: s["teacher"].update({"fc.weight": torch.zeros(1)})),  # a wrong shape
        ("teacher", lambda s: s.update(teacher={"fc.weight": "x"})),  # not a tensor
    ],
)
def test_resume_refuses_an_edited_ema_or_teacher_in_one_line(data, tmp_path, entry, edit):
    """The EMA and the phase-2 teacher of a training state are data like the rest: an edited one is
    one `error:` line naming the entry, not an internal error when it reaches load_state_dict."""
    opts = dict(epochs=1, phase2_epochs=1, ema_decay=0.9, distill=True, **FAST)
    retrofit.finetune(se_model(), data, output_dir=tmp_path / "run", **opts)
    path = tmp_path / "run" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    assert entry in state
    edit(state)
    torch.save(state, path)
    with pytest.raises(RetrofitError, match=f"damaged or was edited: .*'{entry}'"):
        retrofit.finetune(se_model(), data, output_dir=tmp_path / "run", resume=True, **dict(opts, phase2_epochs=1))


def test_the_epoch_hook_sees_each_row_draws_nothing_and_can_end_the_run(data, tmp_path, caplog):
    """`on_event` (what `retrofit tune` reports to its pruner through): its `epoch` events carry the rows,
    which are bitwise those of a run without it, and are logged on `retrofit.finetune`; a true answer after
    epoch 1 of 3 ends there, with the first rows of the full run (the schedule stays that of 3 epochs) and a
    run folder complete up to that epoch."""
    full = retrofit.finetune(se_model(), data, epochs=3, restore_best=False, **FAST)
    seen = []
    with caplog.at_level(logging.INFO, logger="retrofit"):
        watched = retrofit.finetune(
            se_model(), data, epochs=3, restore_best=False, on_event=lambda e: seen.append(e) and False, **FAST
        )
    assert watched.rows == full.rows
    assert [(e.source, e.kind) for e in seen] == [("finetune", "epoch")] * 3
    assert [e.data for e in seen] == full.rows[2:]
    assert [r.message for r in caplog.records if r.name == "retrofit.finetune"] == [e.message for e in seen]
    assert seen[0].message == f"epoch 1: top-1 {full.rows[2]['top1']:.2f}%, val loss {full.rows[2]['val_loss']:.4f}"
    stopped = retrofit.finetune(
        se_model(),
        data,
        epochs=3,
        restore_best=False,
        on_event=lambda e: e.data["epoch"] == 1,
        output_dir=tmp_path / "run",
        **FAST,
    )
    assert stopped.rows == full.rows[:3]
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 3 and not list((tmp_path / "run").glob(".*.tmp"))


def test_the_old_epoch_hook_and_positional_epochs_still_work_with_a_deprecation_warning(data):
    """`on_epoch=` and `finetune(model, data, EPOCHS)` of earlier versions: the same run, and a
    DeprecationWarning naming the new call (issue 23)."""
    new = []
    ran = retrofit.finetune(
        se_model(), data, epochs=2, restore_best=False, on_event=lambda e: new.append(e.data["name"]), **FAST
    )
    old = []
    with pytest.warns(DeprecationWarning, match="pass on_event=fn"):
        legacy = retrofit.finetune(
            se_model(), data, epochs=2, restore_best=False, on_epoch=lambda row: old.append(row["name"]), **FAST
        )
    assert old == new == ["epoch 1", "epoch 2"] and legacy.rows == ran.rows
    with pytest.warns(DeprecationWarning, match="pass epochs=EPOCHS"):
        positional = retrofit.finetune(se_model(), data, 2, restore_best=False, **FAST)
    assert positional.rows == ran.rows
