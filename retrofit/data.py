"""The user's labelled images: an ImageFolder (``train/<class>/*.jpg``, ``val/<class>/*.jpg``) read by timm.

Datasets are timm's :class:`~timm.data.ImageDataset` (its ImageFolder reader), transforms come from
:func:`timm.data.resolve_data_config` on the model's own ``pretrained_cfg`` and
:func:`timm.data.create_transform`. The loaders are plain ``DataLoader`` objects rather than
:func:`timm.data.create_loader`, for two reasons: its distributed validation sampler pads the last
shard with repeated images (the global top-1 would count them twice), and it takes no sampler of ours
(the training order must be a function of ``(seed, epoch)`` only, so a resumed run sees the same
batches as an uninterrupted one and 1 and N processes see the same global batches).

An image that cannot be decoded is skipped, not replaced: timm's dataset substitutes the next image,
which would count it twice in validation and hide the problem. Here the dataset yields a
:class:`BadImage` marker, :func:`collate` drops it from the batch and reports it, and the training loop
warns once per file and counts them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from PIL import Image
from timm.data import ImageDataset, create_transform, resolve_data_config
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .errors import RetrofitError, RetrofitWarning, first_line

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


class SkippingImageDataset(ImageDataset):
    """timm's ImageDataset that yields a :class:`BadImage` for a file it cannot decode."""

    def __getitem__(self, index: int):
        path, target = self.reader.samples[index]  # the path: the reader's own item is an open file
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img = img.convert(self.input_img_mode) if self.input_img_mode else img
                img.load()  # decode now, so a truncated file fails here and not inside a transform
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return BadImage(str(path), first_line(err))
        if self.transform is not None:
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

        >>> data = ImageFolderData.open("data/", model, input_size=(3, 224, 224))
        >>> data.classes, len(data.train), len(data.val)
    """

    root: Path
    train: SkippingImageDataset
    val: SkippingImageDataset
    classes: list[str]
    config: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path, model: torch.nn.Module, input_size: tuple[int, ...] | None = None,
             augment: bool = True) -> "ImageFolderData":
        root = Path(root).expanduser()
        if not root.is_dir():
            raise RetrofitError(f"data folder {root} not found; give a folder with train/<class>/*.jpg "
                                f"and val/<class>/*.jpg")
        for split in SPLITS:
            if not (root / split).is_dir():
                raise RetrofitError(f"{root} has no {split}/ folder; expected {root}/train/<class>/*.jpg "
                                    f"and {root}/val/<class>/*.jpg")
        found = {}
        for split in SPLITS:
            folder = root / split
            try:
                found[split] = SkippingImageDataset(str(folder), input_img_mode="RGB")
            except Exception as err:  # timm's reader: "Found 0 images in subfolders of ..."
                raise RetrofitError(f"no images in {folder} ({first_line(err)}); put each class's "
                                    f"images in {folder}/<class>/") from None
            if len(found[split]) == 0:
                raise RetrofitError(f"no images in {folder}; put each class's images in {folder}/<class>/")
        train_classes = list(found["train"].reader.class_to_idx)
        val_classes = list(found["val"].reader.class_to_idx)
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(train_classes))
            raise RetrofitError(f"train/ and val/ in {root} have different classes (only in train: "
                                f"{_few(only_train)}; only in val: {_few(only_val)}); give both the same "
                                f"class folders")
        args = {"input_size": tuple(input_size)} if input_size else {}
        config = resolve_data_config(args, model=model)
        found["train"].transform = create_transform(**config, is_training=augment, no_aug=not augment)
        found["val"].transform = create_transform(**config, is_training=False)
        return cls(root, found["train"], found["val"], train_classes, config)

    def train_loader(self, batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                     workers: int = 0) -> DataLoader:
        """Shuffled by ``(seed, epoch)`` (call ``loader.sampler.set_epoch``), last partial batch dropped.
        ``batch_size`` is per process; the global order does not depend on the number of processes."""
        sampler = DistributedSampler(self.train, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=False)
        return DataLoader(self.train, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=collate, drop_last=True, persistent_workers=False)

    def val_loader(self, batch_size: int, *, rank: int = 0, world: int = 1, workers: int = 0) -> DataLoader:
        return DataLoader(self.val, batch_size=batch_size, sampler=ShardSampler(len(self.val), rank, world),
                          num_workers=workers, collate_fn=collate)


def warn_bad(bad: tuple[BadImage, ...], seen: set[str]) -> None:
    """One warning per undecodable file (the first time it is met)."""
    for b in bad:
        if b.path not in seen:
            seen.add(b.path)
            warnings.warn(f"skipped {b.path}: cannot decode it ({b.reason})", RetrofitWarning, stacklevel=2)


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") if names else "none"
