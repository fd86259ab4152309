"""The fine-tune's options (issue 9, point 3): each changes what it claims, against hand computations,
and none breaks a bitwise resume; the control arms' training of a plain network; phase 1 builds no
graph before the first block and no weight gradient for a frozen layer (point 5)."""

import copy

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import retrofit
from retrofit import RetrofitError
from retrofit.train import optim, params
from retrofit.train.loss import Objective
from support import CLASSES, FAST, SIZE, make_folder, plain_model, reference_top1, se_model

TRAIN = 8 * CLASSES  # images in train/ of the module's folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


def train_images(model, root):
    """train/ through timm's eval transform (what augment=False trains on), built here."""
    cfg = timm.data.resolve_data_config({"input_size": (3, SIZE, SIZE)}, model=model)
    tf = timm.data.create_transform(**cfg, is_training=False)
    xs, ys = [], []
    for c, name in enumerate(sorted(p.name for p in (root / "train").iterdir())):
        for f in sorted((root / "train" / name).iterdir()):
            xs.append(tf(Image.open(f).convert("RGB")))
            ys.append(c)
    return torch.stack(xs), torch.tensor(ys)


def test_distillation_and_smoothing_loss_is_the_hand_computation(data):
    """One step on one batch of every image: the loss the loop reports is smoothed cross-entropy plus
    w * T^2 * KL(teacher || student), the teacher being the plain network (computed here from it)."""
    plain = plain_model().eval()
    se = se_model(plain, init="paper")  # random blocks: the student differs from the teacher
    x, y = train_images(plain, data)
    eps, w, t = 0.1, 0.5, 2.0
    with torch.no_grad():
        student, teacher = se.eval()(x), plain(x)
    log_p = student.log_softmax(1)
    ce = -((1 - eps) * log_p.gather(1, y[:, None])[:, 0] + eps * log_p.mean(1)).mean()
    p_t = (teacher / t).softmax(1)
    kl = (p_t * (p_t.log() - (student / t).log_softmax(1))).sum(1).mean()
    hand = ce + w * t * t * kl
    assert kl > 1e-3 and eps * log_p.mean() != 0
    result = retrofit.finetune(
        se,
        data,
        epochs=1,
        batch_size=TRAIN,
        lr=1e-2,
        augment=False,
        workers=0,
        smoothing=eps,
        distill=True,
        distill_weight=w,
        distill_temperature=t,
        restore_best=False,
    )
    assert result.row("epoch 1")["train_loss"] == pytest.approx(hand.item(), rel=1e-5)


def test_mixup_mixes_images_and_labels_and_an_odd_last_image_stays():
    objective = Objective(classes=3, smoothing=0.0, mixup=1.0, cutmix=0.0, distill=0.0, temperature=1.0)
    np.random.seed(0)
    x = torch.randn(5, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1])
    x0 = x.clone()
    mixed, target = objective.mix(x, y)
    assert target.shape == (5, 3) and torch.allclose(target.sum(1), torch.ones(5))
    lam = target[1, 1].item()  # image 1 (class 1) is mixed with image 2 (class 2): the pairs of the even prefix
    assert 0 < lam < 1 and target[1, 2].item() == pytest.approx(1 - lam)
    assert torch.allclose(mixed[1], lam * x0[1] + (1 - lam) * x0[2], atol=1e-6)
    assert torch.equal(mixed[4], x0[4]) and torch.equal(target[4], torch.tensor([0.0, 1.0, 0.0]))


def test_ema_is_its_own_row_and_its_own_weights(data, tmp_path):
    start = se_model()
    se = copy.deepcopy(start)
    result = retrofit.finetune(
        se, data, epochs=2, ema_decay=0.9, augment=False, output_dir=tmp_path / "run", restore_best=False, **FAST
    )
    assert [r["name"] for r in result.rows] == [
        "original",
        "step 0",
        "epoch 1",
        "epoch 1 (ema)",
        "epoch 2",
        "epoch 2 (ema)",
    ]
    ema = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)["ema"]["module"]
    live, before = se.state_dict(), start.state_dict()
    blocks = params.block_params(se)
    assert any(not torch.equal(ema[k], live[k]) for k in blocks)  # an average, not the live weights
    assert all(torch.equal(ema[k], before[k]) for k in before if k not in blocks)  # frozen stays frozen
    averaged = copy.deepcopy(start)
    averaged.load_state_dict(ema)
    assert result.row("epoch 2 (ema)")["top1"] == pytest.approx(reference_top1(averaged, data))


def test_resume_with_every_option_is_bitwise(data, tmp_path, monkeypatch):
    """Phase 1 then phase 2 with all the options on, killed in epoch 3 (phase 2's second): the resumed
    run's weights, EMA, phase-2 teacher and metrics equal the uninterrupted run's; that teacher is the
    model phase 1 left (a phase-1-only run). Batches of 5 are odd: mixup's odd-image path runs."""
    opts = dict(
        epochs=1,
        phase2_epochs=2,
        batch_size=5,
        lr=1e-2,
        workers=0,
        augment=True,
        restore_best=False,
        ema_decay=0.9,
        mixup=0.4,
        cutmix=1.0,
        smoothing=0.1,
        distill=True,
        clip_grad=1.0,
        backbone_lr_scale=0.5,
        channels_last=True,
        weight_decay=0.01,
    )
    start = se_model()
    retrofit.finetune(copy.deepcopy(start), data, output_dir=tmp_path / "a", **opts)
    from retrofit.train.run import Run as _Run

    real = _Run._train_epoch

    def dies_in_epoch_3(self, net, optimizer, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return real(self, net, optimizer, epoch)

    monkeypatch.setattr(_Run, "_train_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        retrofit.finetune(copy.deepcopy(start), data, output_dir=tmp_path / "b", **opts)
    monkeypatch.setattr(_Run, "_train_epoch", real)
    retrofit.finetune(copy.deepcopy(start), data, output_dir=tmp_path / "b", resume=True, **opts)
    a, b = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(tmp_path / d / "train_state.pt", weights_only=True) for d in "ab")
    for key in ("ema", "teacher"):
        ta, tb = (s[key]["module"] if key == "ema" else s[key] for s in (sa, sb))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), key
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    retrofit.finetune(copy.deepcopy(start), data, output_dir=tmp_path / "c", **{**opts, "phase2_epochs": 0})
    phase1 = load_file(tmp_path / "c" / "last.safetensors")
    assert all(torch.equal(sa["teacher"][k], phase1[k]) for k in phase1)
    assert any(not torch.equal(sa["teacher"][k], a[k]) for k in a)  # the student moved on in phase 2


def test_clipping_bounds_the_first_step(data):
    """SGD with momentum, first step: the update is lr x the gradient, so with the norm clipped to c
    the trainable parameters move by exactly lr x c."""
    se = se_model()
    before = {k: v.clone() for k, v in se.state_dict().items()}
    retrofit.finetune(
        se,
        data,
        epochs=1,
        batch_size=TRAIN,
        opt="momentum",
        lr=1.0,
        clip_grad=1e-3,
        augment=False,
        workers=0,
        restore_best=False,
    )
    moved = torch.cat([(se.state_dict()[k] - before[k]).flatten() for k in params.block_params(se)])
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-4)


def test_the_pretrained_parameters_get_their_own_rate():
    se = se_model()
    params.set_trainable(se, None)
    blocks = params.block_params(se)
    groups = params.lr_groups(se, blocks, 0.1, weight_decay=0.05)
    optimizer, _ = optim.create(
        se, opt="adamw", lr=1e-2, weight_decay=0.05, sched="cosine", epochs=2, warmup_epochs=0, groups=groups
    )
    name = {id(p): n for n, p in se.named_parameters()}
    seen = []
    for g in optimizer.param_groups:
        names = [name[id(p)] for p in g["params"]]
        seen += names
        new = {n in blocks for n in names}
        assert len(new) == 1  # a group is all new or all pretrained
        assert g["lr"] == pytest.approx(1e-2 if new == {True} else 1e-3)
        assert g["weight_decay"] == (0.0 if all(se.get_parameter(n).ndim <= 1 for n in names) else 0.05)
    assert sorted(seen) == sorted(name.values())
    assert set(name[id(p)] for p in optimizer.param_groups[0]["params"]) <= blocks


def test_channels_last_gives_the_same_numbers(data):
    a, b = se_model(), se_model()
    ra = retrofit.finetune(a, data, epochs=1, augment=False, restore_best=False, **FAST)
    rb = retrofit.finetune(b, data, epochs=1, augment=False, restore_best=False, channels_last=True, **FAST)
    for ka, kb in zip(ra.rows, rb.rows):
        assert ka["val_loss"] == pytest.approx(kb["val_loss"], rel=1e-4)
        assert ka["train_loss"] == pytest.approx(kb["train_loss"], rel=1e-4) if ka["train_loss"] else True
    assert all(p.is_contiguous() for p in b.parameters())  # given back in the default format


def test_a_plain_network_trains_its_head_and_norms_only(data, tmp_path):
    plain = plain_model()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    result = retrofit.finetune(
        plain, data, epochs=1, train_head=True, train_norms=True, augment=False, restore_best=False, **FAST
    )
    assert result.row("step 0")["val_loss"] == result.row("original")["val_loss"]
    after = plain.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= params.norm_params(plain) | params.head_params(plain)
    assert "bn1.weight" in changed and "fc.weight" in changed
    assert not any("running" in k for k in changed)  # statistics frozen
    with pytest.raises(RetrofitError, match="phase 1 has nothing to train"):
        retrofit.finetune(plain_model(), data, epochs=1, **FAST)
    with pytest.raises(RetrofitError, match="distill needs inserted blocks"):
        retrofit.finetune(plain_model(), data, epochs=1, train_head=True, distill=True, **FAST)
    with pytest.raises(RetrofitError, match="without output_dir"):
        retrofit.finetune(plain_model(), data, epochs=1, train_head=True, output_dir=tmp_path / "x", **FAST)
    with pytest.raises(RetrofitError, match="mixup must be 0 or more"):
        retrofit.finetune(se_model(), data, mixup=-1, **FAST)


def test_phase1_records_no_graph_before_the_first_block_and_no_frozen_gradient(data):
    se = se_model()  # standard position: the first block ends layer1.0
    stem = ["conv1", "bn1", "maxpool", "layer1.0.conv1", "layer1.0.bn2"]
    needs_grad = {}

    def hook(name):
        def record(module, args, out):
            if torch.is_grad_enabled():
                needs_grad.setdefault(name, set()).add(out.requires_grad)

        return record

    for name in stem + ["layer1.0.se", "layer2.0.conv1"]:
        se.get_submodule(name).register_forward_hook(hook(name))
    retrofit.finetune(se, data, epochs=1, augment=False, restore_best=False, **FAST)
    assert all(needs_grad[n] == {False} for n in stem), needs_grad
    assert needs_grad["layer1.0.se"] == {True} and needs_grad["layer2.0.conv1"] == {True}
    blocks = params.block_params(se)
    assert all(p.grad is None for n, p in se.named_parameters() if n not in blocks)


def test_cli_options_reach_the_run_and_bad_values_are_one_line(data, tmp_path):
    from typer.testing import CliRunner

    from retrofit.cli import app

    runner = CliRunner()
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    out = tmp_path / "run"
    args = ["finetune", str(ckpt), "--data", str(data), "-b", "8", "-j", "0", "--output-dir", str(out)]
    done = runner.invoke(
        app,
        args
        + [
            "--ema-decay",
            "0.9",
            "--distill",
            "--smoothing",
            "0.1",
            "--mixup",
            "0.2",
            "--clip-grad",
            "1",
            "--backbone-lr-scale",
            "0.5",
            "--channels-last",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "epoch 1 (ema)" in done.output
    settings = torch.load(out / "train_state.pt", weights_only=True)["settings"]
    assert (
        settings["ema_decay"],
        settings["distill"],
        settings["smoothing"],
        settings["mixup"],
        settings["clip_grad"],
        settings["backbone_lr_scale"],
        settings["channels_last"],
    ) == (0.9, True, 0.1, 0.2, 1.0, 0.5, True)
    bad = runner.invoke(app, args[:-2] + ["--output-dir", str(tmp_path / "bad"), "--smoothing", "1.5"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert [ln for ln in bad.output.splitlines() if ln.startswith("error:")] == [
        "error: smoothing must be in [0, 1), got 1.5"
    ]
    assert not (tmp_path / "bad").exists()
    for command in ("add-se", "sweep"):
        assert "--distill" in runner.invoke(app, [command, "--help"]).output
