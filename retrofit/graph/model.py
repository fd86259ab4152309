"""What a model says about itself: its name and the input size it takes."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..errors import RetrofitError, excerpt

DEFAULT_INPUT_SIZE = (3, 224, 224)


def resolve_input_size(model: nn.Module, input_size: Sequence[int] | str | None = None) -> tuple[int, ...]:
    """``(C, H, W)``: the given size, else the model's own (:func:`own_input_size`), else 3x224x224."""
    if input_size is None:
        input_size = own_input_size(model) or DEFAULT_INPUT_SIZE
    if isinstance(input_size, str):
        input_size = input_size.replace("x", ",").split(",")
    try:
        size = tuple(int(str(v).strip()) for v in input_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise RetrofitError(
            f"input size must be three positive whole numbers C,H,W (e.g. 3,224,224), got {excerpt(input_size)}"
        )
    return size


def own_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """The input size a model states: timm's ``pretrained_cfg["input_size"]``; a torchvision
    detector's transform, which resizes every image to ``min_size`` on its short side (at most
    ``max_size`` on its long one), so a square image of that side is what its backbone sees; a
    Hugging Face vision config's ``num_channels`` and ``image_size``. None when it states none."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(cfg["input_size"])
    transform = getattr(model, "transform", None)
    if isinstance(transform, GeneralizedRCNNTransform):
        side = min(int(transform.min_size[-1]), int(transform.max_size))
        return (len(transform.image_mean), side, side)
    config = getattr(model, "config", None)
    image, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(image, int) and isinstance(channels, int):
        return (channels, image, image)
    if isinstance(image, (tuple, list)) and len(image) == 2 and isinstance(channels, int):
        return (channels, *map(int, image))
    return None


# -- names --------------------------------------------------------------------------------------------
def architecture_of(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") if isinstance(cfg, dict) else None


def model_name(model: nn.Module) -> str:
    return architecture_of(model) or type(model).__name__
