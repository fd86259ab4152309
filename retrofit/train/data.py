"""The user's labelled images: an ImageFolder (``train/<class>/*.jpg``, ``val/<class>/*.jpg``) read by timm.

Datasets are timm's :class:`~timm.data.ImageDataset` (its ImageFolder reader), transforms come from
:func:`timm.data.resolve_data_config` on the model's own ``pretrained_cfg`` and
:func:`timm.data.create_transform`. The loaders are plain ``DataLoader`` objects rather than
:func:`timm.data.create_loader`, for two reasons: its distributed validation sampler pads the last
shard with repeated images (the global top-1 would count them twice), and it takes no sampler of ours
(the training order must be a function of ``(seed, epoch)`` only, so a resumed run sees the same
batches as an uninterrupted one and 1 and N processes see the same global batches).

The images are found here (:func:`find_images`), not by timm's reader: timm walks the folder following
symbolic links without remembering where it has been, so a link back to a parent folder multiplies the
data (48 images read as 1,968), and it names a class after each image's own folder (``train/cat/a/`` and
``train/dog/a/`` both become class ``a``; an image directly in ``train/`` a class with an empty name).
Here a class is a folder directly under ``train/``, its images are every image below it, and no folder
is read twice. An image outside any class folder, a single class or no image at all is refused.

An image that cannot be decoded is skipped, not replaced: timm's dataset substitutes the next image,
which would count it twice in validation and hide the problem. Here the dataset yields a
:class:`BadImage` marker, :func:`collate` drops it from the batch and reports it, and the training loop
warns once per file and counts them (an epoch with no usable image is refused by the fine-tune).

Training batches (:class:`TrainBatches`) cover every image of an epoch, the last batch smaller when the
set does not divide (phase 1 freezes the norm layers, so a small batch changes nothing but the step's
noise); a set smaller than one batch is one step.

An image's augmentation is drawn from ``(seed, epoch, index)`` alone (:func:`sample_rng`), in whichever
process loads it: ``workers=0`` and ``workers=N`` train on the same images and give the same weights.
(Left to themselves, timm's transforms draw from the global RNGs, which a DataLoader worker reseeds
from its own id: an image's crop depended on the worker that loaded it, and with no workers the
transforms' draws interleaved with the main process's mixup and dropout.)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset, create_transform, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader import Reader
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils.misc import natural_key
from torch.utils.data import DataLoader, Sampler

from ..errors import RetrofitError, RetrofitWarning, excerpt, first_line

SPLITS = ("train", "val")


@dataclass(frozen=True)
class BadImage:
    """An image that could not be read or decoded (the marker that replaces its sample)."""

    path: str
    reason: str


class Batch(NamedTuple):
    images: torch.Tensor
    targets: torch.Tensor
    bad: tuple[BadImage, ...]  # images of this batch that were dropped


class SampleKey(NamedTuple):
    """A training image of one epoch, as :class:`TrainBatches` yields it: its augmentation is drawn from
    ``(seed, epoch, index)`` (:func:`sample_rng`)."""

    index: int
    seed: int
    epoch: int


@contextlib.contextmanager
def sample_rng(key: SampleKey) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generator seeded from a hash of ``key`` for one image's
    transform, then restored: timm's random resized crop and erasing draw from ``random``, torchvision's
    flip and colour jitter from torch, and the draws of the process that loads the image (mixup,
    dropout in the main process) stay as they were."""
    digest = hashlib.blake2b(f"{key.seed}:{key.epoch}:{key.index}".encode(), digest_size=8).digest()
    h = int.from_bytes(digest, "little")
    cpu = torch.random.default_generator  # not torch.manual_seed: that reseeds the GPUs' generators too
    saved = random.getstate(), np.random.get_state(), cpu.get_state()
    random.seed(h)
    np.random.seed(h % 2**32)
    cpu.manual_seed(h)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        cpu.set_state(saved[2])


class SkippingImageDataset(ImageDataset):
    """timm's ImageDataset that yields a :class:`BadImage` for a file it cannot decode; given a
    :class:`SampleKey`, it draws the image's augmentation from it."""

    def __getitem__(self, index: int | SampleKey):
        key = index if isinstance(index, SampleKey) else None
        index = key.index if key is not None else index
        path, target = self.reader.samples[index]  # the path: the reader's own item is an open file
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img = img.convert(self.input_img_mode) if self.input_img_mode else img
                img.load()  # decode now, so a truncated file fails here and not inside a transform
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return BadImage(str(path), first_line(err))
        if self.transform is not None:
            with sample_rng(key) if key is not None else contextlib.nullcontext():
                img = self.transform(img)
        return img, target


def collate(samples: list) -> Batch:
    """Stack the good samples, report the bad ones."""
    bad = tuple(s for s in samples if isinstance(s, BadImage))
    good = [s for s in samples if not isinstance(s, BadImage)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
    images, targets = torch.utils.data.default_collate(good)
    return Batch(images, targets, bad)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order, without padding: every validation image is seen
    by exactly one process once, so summed counts give the exact global top-1."""

    def __init__(self, size: int, rank: int = 0, world: int = 1):
        self.indices = range(rank, size, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class ImageFolderData:
    """The train and val datasets of one data folder, with the model's transforms.

    Example::

        >>> data = ImageFolderData.open("data/", model, input_size=(3, 224, 224), augment=True)
        >>> data.classes, len(data.train), len(data.val)
        (['class0', 'class1', 'class2'], 24, 12)
    """

    root: Path
    train: SkippingImageDataset
    val: SkippingImageDataset
    classes: list[str]
    config: dict[str, Any]

    @classmethod
    def open(
        cls, root: str | Path, model: torch.nn.Module, input_size: tuple[int, ...] | None = None, *, augment: bool
    ) -> ImageFolderData:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise RetrofitError(
                f"data folder {excerpt(root)} not found; give a folder with train/<class>/*.jpg and val/<class>/*.jpg"
            )
        for split in SPLITS:
            if not (root / split).is_dir():
                raise RetrofitError(
                    f"{excerpt(root)} has no {split}/ folder; expected "
                    f"{excerpt(root)}/train/<class>/*.jpg "
                    f"and {excerpt(root)}/val/<class>/*.jpg"
                )
        found = {split: SkippingImageDataset(str(root / split), reader=find_images(root / split)) for split in SPLITS}
        empty = [f"{split}/{name}" for split in SPLITS for name in found[split].reader.empty]
        if empty:  # dropped as timm drops them, but said: a class may be missing by mistake
            warnings.warn(
                f"{excerpt(root)}: {len(empty)} empty class folder(s) skipped (no images): "
                f"{excerpt(_few(empty), 200, bare=True)}",
                RetrofitWarning,
                stacklevel=2,
            )
        train_classes = list(found["train"].reader.class_to_idx)
        val_classes = list(found["val"].reader.class_to_idx)
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(train_classes))
            raise RetrofitError(
                f"train/ and val/ in {excerpt(root)} have different classes (only in train: "
                f"{_few(only_train)}; only in val: {_few(only_val)}); give both the same "
                f"class folders"
            )
        if len(train_classes) < 2:
            raise RetrofitError(
                f"{excerpt(root)}/train has one class ({excerpt(train_classes[0], bare=True)}); a "
                "classifier needs two or more "
                f"class folders"
            )
        args = {"input_size": tuple(input_size)} if input_size else {}
        config = resolve_data_config(args, model=model)
        found["train"].transform = create_transform(**config, is_training=augment, no_aug=not augment)
        found["val"].transform = create_transform(**config, is_training=False)
        return cls(root, found["train"], found["val"], train_classes, config)

    def train_loader(
        self, micro_batch: int, *, batch_size: int, seed: int, workers: int, rank: int = 0, world: int = 1
    ) -> DataLoader:
        """Shuffled by ``(seed, epoch)`` (call ``loader.batch_sampler.set_epoch``); see
        :class:`TrainBatches`. ``micro_batch`` is per process, ``batch_size`` global (one step)."""
        batches = TrainBatches(len(self.train), batch_size, micro_batch, seed=seed, rank=rank, world=world)
        return DataLoader(
            self.train, batch_sampler=batches, num_workers=workers, collate_fn=collate, persistent_workers=False
        )

    def describe(self) -> str:
        """``48 train and 12 val images in 3 classes``: what was found, for the user to check."""
        return f"{len(self.train)} train and {len(self.val)} val images in {len(self.classes)} classes"

    def val_loader(self, batch_size: int, *, workers: int, rank: int = 0, world: int = 1) -> DataLoader:
        return DataLoader(
            self.val,
            batch_size=batch_size,
            sampler=ShardSampler(len(self.val), rank, world),
            num_workers=workers,
            collate_fn=collate,
        )


class TrainBatches(Sampler[list[SampleKey]]):
    """This process's micro-batches of one epoch, cut from one order of the whole training set; each
    image is a :class:`SampleKey`, so its augmentation follows ``(seed, epoch, index)``.

    The order is ``randperm(len, seed + epoch)``, whatever the number of processes; optimizer step
    ``s`` takes images ``[s * batch, (s + 1) * batch)`` of it, cut into micro-batches of ``micro *
    world`` images, of which process ``rank`` takes every ``world``-th. So 1 and N processes, and a
    resumed run, see the same global batches. Every image is used: the last step is smaller when the
    set does not divide, and a part of it may be empty on some process (the loop then takes a zero
    step, so the processes stay in lock-step). :meth:`step_images` gives the loop each step's global
    image count, so a partial step weighs each image as a full one does.

    ``set_epoch(epoch, no_single=True)`` (phase 2: the norm layers train on batch statistics) leaves
    out the last micro-batch when it would give a process a batch of one image.
    """

    def __init__(self, size: int, batch: int, micro: int, *, seed: int, rank: int = 0, world: int = 1):
        if batch % (micro * world):
            raise ValueError(f"batch {batch} is not a multiple of micro-batch {micro} x {world} processes")
        self.size, self.batch, self.micro, self.seed, self.rank, self.world = size, batch, micro, seed, rank, world
        self.epoch, self.used = 0, size

    def set_epoch(self, epoch: int, no_single: bool = False) -> None:
        self.epoch = epoch
        group, tail = self.micro * self.world, self.size % (self.micro * self.world)
        # the smallest share of the last, partial micro-batch: 1 when it has fewer images than processes
        single = tail and tail // self.world <= 1 and self.micro > 1
        self.used = self.size - tail if no_single and single and self.size > group else self.size

    @property
    def left_out(self) -> int:
        """Images of each epoch that :meth:`set_epoch` left out (0 but in phase 2 with a tail of one)."""
        return self.size - self.used

    def __iter__(self) -> Iterator[list[SampleKey]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)  # as DistributedSampler orders: the same global order
        order = torch.randperm(self.size, generator=g).tolist()[: self.used]
        group = self.micro * self.world
        for start in range(0, self.used, group):
            yield [SampleKey(i, self.seed, self.epoch) for i in order[start : start + group][self.rank :: self.world]]

    def __len__(self) -> int:
        return math.ceil(self.used / (self.micro * self.world))

    def step_images(self, i: int) -> int:
        """Images (over all processes) of the optimizer step that micro-batch ``i`` belongs to."""
        accum = self.batch // (self.micro * self.world)
        return min(self.batch, self.used - (i // accum) * self.batch)


def find_images(folder: Path) -> FoundImages:
    """The images of one split, as timm's folder reader: class ``c`` is ``folder/c/``, its images all
    images below it (links followed, no folder twice), in timm's natural order.

    A class folder without images is left out (as timm does), its name in ``.empty``.

    Raises:
        RetrofitError: no image, or images directly in ``folder``.
    """
    types = get_img_extensions(as_set=True)
    loose = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in types and p.is_file())
    if loose:
        raise RetrofitError(
            f"{len(loose)} image(s) directly in {excerpt(folder)} (e.g. "
            f"{excerpt(loose[0], bare=True)}) belong to no class; "
            f"move them into {excerpt(folder)}/<class>/ (a folder per class)"
        )
    dirs = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name))
    seen = {_inode(p) for p in (folder, *dirs)}  # a class never reads the split or another class
    again: list[str] = []
    samples, classes, empty = [], [], []
    for d in dirs:
        seen.discard(_inode(d))
        files = []
        for where, subdirs, names in os.walk(d, followlinks=True):
            if _inode(where) in seen:  # a loop, or a folder linked twice: read once
                again.append(where)
                subdirs[:] = []
                continue
            seen.add(_inode(where))
            files += [os.path.join(where, n) for n in names if os.path.splitext(n)[1].lower() in types]
        if files:
            samples += [(f, len(classes)) for f in files]
            classes.append(d.name)
        else:
            empty.append(d.name)
    if again:
        warnings.warn(
            f"{excerpt(folder)}: {len(again)} folder(s) reached again through a symbolic link (e.g. "
            f"{excerpt(again[0], bare=True)}) "
            f"were not read twice; {len(samples)} images found",
            RetrofitWarning,
            stacklevel=3,
        )
    if not samples:
        raise RetrofitError(
            f"no images in {excerpt(folder)}; put each class's images in {excerpt(folder)}/<class>/ "
            f"({', '.join(sorted(types))})"
        )
    return FoundImages(folder, sorted(samples, key=lambda k: natural_key(k[0])), classes, empty)


def _inode(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class FoundImages(ReaderImageFolder):
    """timm's folder reader over the images :func:`find_images` found (its own search is not run)."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], classes: list[str], empty: list[str] = ()):
        Reader.__init__(self)
        self.root, self.samples, self.empty = str(root), samples, list(empty)
        self.class_to_idx = {c: i for i, c in enumerate(classes)}


def warn_bad(bad: tuple[BadImage, ...], seen: set[str]) -> None:
    """One warning per undecodable file (the first time it is met)."""
    for b in bad:
        if b.path not in seen:
            seen.add(b.path)
            warnings.warn(
                f"skipped {excerpt(b.path, bare=True)}: cannot decode it ({b.reason})", RetrofitWarning, stacklevel=2
            )


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "none"
