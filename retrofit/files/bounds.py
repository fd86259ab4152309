"""The bounds on the sizes a retrofit file may ask for. A file is data, and may not ask for any amount
of memory: a head of 10^9 classes is 2 TB of weights at 512 features.

Every size-like value retrofit reads from a file's metadata (a training state holds the same
metadata) is checked against the largest value a real model has, before anything is built. The
values are the constructor arguments ``num_classes`` and ``in_chans``, the sides of ``input_size``,
and the counts ``blocks`` and ``base_tensors``. Retrofit does not write a file outside these bounds
(:func:`retrofit.files.header.metadata`), so it never writes a file it would refuse to read, and
``--num-classes`` is held to the same bound before a model is built. No torch here: the command
line checks its options with it before importing torch.
"""

from __future__ import annotations

from typing import Any

from ..errors import excerpt

# name: (smallest, largest) whole number
SIZES = {
    # ImageNet-22k heads have 21,843 classes; face-recognition heads a few hundred thousand
    # identities (Glint360K: 360,232)
    "num_classes": (0, 1_000_000),
    "in_chans": (1, 1024),  # hyperspectral stems take a few hundred bands
    # pixels on each side of input_size: timm's largest pretrained input is 1024, a torchvision
    # detector's default 1333
    "input side": (1, 8192),
    "blocks": (1, 100_000),  # inserted blocks: a ResNet-152 takes 50, the deepest timm models a few hundred
    "base_tensors": (0, 10_000_000),  # state-dict tensors an adapter takes from its base
}


# a safetensors header (retrofit's files and the user's weight files), checked from its first 8 bytes and a
# count of its entries before it is parsed: timm's largest models have about 2,000 tensors and 213 KB of
# header (efficientnet_l2: 1,914; vit_giant_patch14_224: 488 and 52 KB), safetensors itself takes 100 MB
HEADER_BYTES = 16 << 20
TENSORS = 100_000


def out_of_bounds(name: str, value: Any) -> str | None:
    """Why ``value`` is no valid ``name`` (one clause naming the bound), or None when it is one."""
    low, high = SIZES[name]
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return None
    shown = (
        f"{value:,}"
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**30
        else excerpt(value, 40)
    )
    return f"{name} = {shown}, not a whole number from {low:,} to {high:,} (the bound on {name} in a retrofit file)"


def whole_number(text: str, name: str) -> int:
    """A count written as text in a file's metadata (``blocks``...), checked against its bound (a
    ``ValueError`` naming it, if not). No more digits than the bound has are ever converted."""
    low, high = SIZES[name]
    if not text.isascii() or not text.isdigit() or len(text) > len(str(high)):
        raise ValueError(
            f"{name} = {excerpt(text)}, not a whole number from {low:,} to {high:,} (the bound on "
            f"{name} in a retrofit file)"
        )
    problem = out_of_bounds(name, int(text))
    if problem:
        raise ValueError(problem)
    return int(text)
