"""The data folder of a fine-tune: what is found in it (links, nesting), what is refused, and the
training batches (every image once per epoch, the same global batches for 1 and N processes)."""

import json
import os

import pytest
import torch
from typer.testing import CliRunner

import retrofit
from retrofit import RetrofitError, RetrofitWarning
from retrofit.cli import app
from retrofit.train.data import ImageFolderData, TrainBatches
from support import make_folder, se_model

runner = CliRunner()


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_links_are_followed_once_and_nested_folders_belong_to_their_class(tmp_path):
    """A link back to train/ (a loop) and a folder linked twice are read once; an image in a subfolder
    of a class is that class's (timm's walk names it after its own folder)."""
    root = make_folder(tmp_path / "d")  # 8 train and 4 val images per class, 3 classes
    os.symlink("..", root / "train" / "class0" / "loop")
    os.symlink("../class1", root / "train" / "class2" / "again")
    os.symlink(".", root / "val" / "class1" / "self")
    (root / "train" / "class2" / "sub").mkdir()
    (root / "train" / "class1" / "0.png").rename(root / "train" / "class2" / "sub" / "moved.png")
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    result = runner.invoke(
        app, ["finetune", str(ckpt), "--data", str(root), "-b", "8", "-j", "0", "--output-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    assert f"{root}: 24 train and 12 val images in 3 classes" in result.stderr
    assert "reached again through a symbolic link" in result.stderr
    assert rows(tmp_path / "run")[-1]["train_images"] == 24
    with pytest.warns(RetrofitWarning, match="reached again"):
        data = ImageFolderData.open(root, se_model(), (3, 32, 32), augment=True)
    labels = {os.path.basename(p): data.classes[c] for p, c in data.train.reader.samples}
    assert labels["moved.png"] == "class2" and data.classes == ["class0", "class1", "class2"]


def test_empty_class_folders_are_named_in_one_warning(tmp_path):
    """Issue 22.6: empty class folders in train/ and val/ were dropped without a word (timm drops them);
    now one warning names them, as undecodable images are named, and the run goes on without them."""
    root = make_folder(tmp_path / "d", train=2, val=1)
    for split, name in (("train", "cats"), ("val", "cats"), ("val", "dogs"), ("train", "dogs")):
        (root / split / name).mkdir()
    (root / "val" / "dogs" / "notes.txt").write_text("not an image")  # a folder without images is empty
    with pytest.warns(RetrofitWarning) as caught:
        data = ImageFolderData.open(root, se_model(), (3, 32, 32), augment=True)
    assert [str(w.message) for w in caught] == [
        f"{root}: 4 empty class folder(s) skipped (no images): train/cats, train/dogs, val/cats, val/dogs"
    ]
    assert data.classes == ["class0", "class1", "class2"]
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    result = runner.invoke(
        app,
        [
            "finetune",
            str(ckpt),
            "--data",
            str(root),
            "-b",
            "6",
            "-j",
            "0",
            "--epochs",
            "1",
            "--output-dir",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert [ln for ln in result.stderr.splitlines() if "empty class" in ln] == [
        f"warning: {root}: 4 empty class folder(s) skipped (no images): train/cats, train/dogs, val/cats, val/dogs"
    ]


def test_what_cannot_be_trained_on_is_refused(tmp_path):
    se = se_model()
    one = make_folder(tmp_path / "one", train=2, val=1)
    for split in ("train", "val"):
        for c in ("class1", "class2"):
            for f in (one / split / c).iterdir():
                f.rename(one / split / "class0" / f"{c}-{f.name}")
            (one / split / c).rmdir()
    with pytest.raises(RetrofitError, match=r"train has one class \(class0\); a classifier needs two or more"):
        retrofit.finetune(se, one, batch_size=6, workers=0)
    loose = make_folder(tmp_path / "loose", train=2, val=1)
    (loose / "train" / "class0" / "0.png").rename(loose / "train" / "stray.png")
    with pytest.raises(RetrofitError, match=r"1 image\(s\) directly in .*train \(e.g. stray.png\) belong to no class"):
        retrofit.finetune(se, loose, batch_size=6, workers=0)
    broken = make_folder(tmp_path / "broken", train=2, val=1)
    for f in (broken / "train").rglob("*.png"):
        f.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    ckpt = retrofit.save(se, tmp_path / "se.safetensors")
    result = runner.invoke(
        app, ["finetune", str(ckpt), "--data", str(broken), "-b", "6", "-j", "0", "--output-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: none of the 6 images in {broken}/train could be decoded (each is named in a warning); "
        f"replace or remove them"
    ]


def test_a_set_smaller_than_one_batch_trains_on_every_image(tmp_path):
    """24 images, the default batch of 32: one step of 24 (phase 1 freezes the norm layers)."""
    data = make_folder(tmp_path / "d")
    ckpt = retrofit.save(se_model(), tmp_path / "se.safetensors")
    result = runner.invoke(
        app, ["finetune", str(ckpt), "--data", str(data), "-j", "0", "--output-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    assert "fewer than one batch of 32: each epoch is one step on all of them" in result.stderr
    assert rows(tmp_path / "run")[-1]["train_images"] == 24


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_train_batches_are_the_global_batches_whatever_the_processes(world, accum):
    """27 images, global batch 12: every process's micro-batch i holds its share of the same global
    images, in the order of torch.randperm(27, seed + epoch) (DistributedSampler's), every image once."""
    size, batch, seed, epoch = 27, 12, 5, 3
    micro = batch // (world * accum)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = []
    for rank in range(world):
        sampler = TrainBatches(size, batch, micro, seed=seed, rank=rank, world=world)
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert {(k.seed, k.epoch) for b in keys for k in b} == {(seed, epoch)}  # what the augmentation follows
        per_rank.append([[k.index for k in b] for b in keys])
        assert len(sampler) == len(per_rank[-1])
    assert len({len(b) for b in per_rank}) == 1  # the same number of micro-batches on every process
    merged = [i for group in zip(*per_rank) for i in sorted(sum(group, []), key=order.index)]
    assert merged == order  # micro-batch by micro-batch, the global order, every image once
    for i in range(len(per_rank[0])):
        step = i // accum
        assert sampler.step_images(i) == min(batch, size - step * batch)  # 12, 12, then the last 3
    assert sampler.step_images(len(per_rank[0]) - 1) == 3


def test_phase_2_leaves_out_a_last_batch_of_one_image():
    two = TrainBatches(27, 8, 4, seed=0, rank=1, world=2)  # the last 3 images: 2 on rank 0, 1 on rank 1
    two.set_epoch(1, no_single=True)
    assert two.left_out == 3 and sum(len(b) for b in two) == 12
    two.set_epoch(2)
    assert two.left_out == 0 and sum(len(b) for b in two) == 13
    one = TrainBatches(26, 8, 8, seed=0)  # a last batch of 2: kept
    one.set_epoch(1, no_single=True)
    assert one.left_out == 0
