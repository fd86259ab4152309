"""Getting the user's model: timm names (with close-name suggestions) and local weight files."""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import RetrofitError, excerpt, first_line
from ..inputs import regular_file
from .meta_check import check_checkpoint
from .tensors import HeaderBound, dtype_fits, dtype_name, safetensors_header


def create_model(
    name: str, *, checkpoint: str | Path | None = None, pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """Build a timm model by name, optionally with weights.

    Args:
        name: a timm model name (``resnet50``, ``inception_v3``...).
        checkpoint: a local weight file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``), loaded through
            timm's own pretrained path (``pretrained_cfg_overlay=dict(file=...)``): pickled files are
            read with ``weights_only=True``. The file's classifier is loaded when ``num_classes`` is
            its size or not given (the model then gets the file's number of classes); another
            ``num_classes`` gets a new head, as timm does for hub weights. The file is checked first
            (:func:`checkpoint_tensors`) and every tensor's dtype after (:func:`_check_dtypes`).
        pretrained: download the hub weights (needs network access).
        **kwargs: passed to ``timm.create_model`` (``num_classes``, ``in_chans``...).
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6) if len(name) < 200 else []
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models()` lists them"
        raise RetrofitError(f"unknown model {excerpt(name)}{hint}")
    if checkpoint is not None:
        path = regular_file(checkpoint, "checkpoint")  # a directory, a FIFO, a device, a loop: said as what it is
        tensors = checkpoint_tensors(path)
        check_checkpoint(name, kwargs, tensors, checkpoint)  # on the meta device: no memory
        overlay = dict(file=str(path.resolve()))
        classes = checkpoint_classes(path, name, tensors)
        if classes is not None:  # timm keeps the file's head only when its size is the config's
            overlay["num_classes"] = classes
            kwargs.setdefault("num_classes", classes)
        kwargs["pretrained_cfg_overlay"] = overlay
        pretrained = True
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if checkpoint is None:
            raise
        raise RetrofitError(
            f"checkpoint {excerpt(checkpoint, bare=True)} does not fit {name}: "
            f"{describe_mismatch(err)}; "
            f"is it a checkpoint of this architecture?"
        ) from None
    except Exception as err:
        if checkpoint is None:
            raise RetrofitError(f"cannot build {name}: {first_line(err)}") from None
        raise RetrofitError(
            f"cannot read checkpoint {excerpt(checkpoint, bare=True)} ({type(err).__name__}: "
            f"{first_line(err)}); "
            f"is it a complete .safetensors or .pth file?"
        ) from None
    if checkpoint is not None:
        _check_dtypes(model, tensors, checkpoint)
    return model


def checkpoint_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The name, dtype (safetensors' names: ``F32``, ``I64``...) and shape of every tensor in a weight
    file, found as timm's ``load_state_dict`` finds them (inside ``state_dict_ema``, ``model_ema``,
    ``state_dict`` or ``model``; ``module.`` prefixes dropped), without reading the data: the header of
    a ``.safetensors`` file, ``torch.load(weights_only=True, mmap=True)`` for the others, so no pickled
    code runs. An unreadable file, or entries that are not tensors, are one error."""
    try:
        if path.suffix == ".safetensors":
            return safetensors_header(path)[1]
        with torch.serialization.safe_globals([argparse.Namespace]):  # as timm: training checkpoints' args
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy format
    except HeaderBound as err:
        raise RetrofitError(f"cannot read checkpoint {excerpt(path)}: {err}; is it a weight file?") from None
    except Exception as err:  # a pickle that would run code, a truncated zip, I/O: no usable weights
        raise RetrofitError(
            f"cannot read checkpoint {excerpt(path)} ({type(err).__name__}: {first_line(err)}); is it "
            f"a complete .safetensors or .pth weight file? (pickled code is never run)"
        ) from None
    if isinstance(state, dict):
        for wrapper in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm's order (use_ema)
            if state.get(wrapper) is not None:
                state = state[wrapper]
                break
    if not isinstance(state, dict):
        raise RetrofitError(f"checkpoint {excerpt(path)} holds a {type(state).__name__}, not a state dict of tensors")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise RetrofitError(
                f"checkpoint {excerpt(path)}: entry {excerpt(key)} is a {type(value).__name__}, not a "
                f"tensor; give a state dict of tensors"
            )
        for prefix in ("_orig_mod.", "module.", "_orig_mod."):  # timm's clean_state_dict
            key = key[len(prefix) :] if key.startswith(prefix) else key
        out[key] = (dtype_name(value.dtype), tuple(value.shape))
    return out


def _check_dtypes(model: nn.Module, tensors: dict[str, tuple[str, tuple[int, ...]]], checkpoint) -> None:
    """A weight whose dtype does not fit (an integer tensor for a float weight: a relabelled or foreign
    file) would be cast silently by ``load_state_dict``; refuse it. Names that timm's filter renamed on
    the way are not seen here (timm checks their shapes)."""
    for key, value in model.state_dict().items():
        if key in tensors and not dtype_fits(tensors[key][0], value.dtype):
            raise RetrofitError(
                f"checkpoint {excerpt(checkpoint, bare=True)}: {key} is {tensors[key][0]} in the file "
                "but "
                f"{dtype_name(value.dtype)} in {type(model).__name__}; the file was edited or "
                f"is not a weight file of this model"
            )


def checkpoint_classes(path: Path, name: str, tensors: dict | None = None) -> int | None:
    """The number of classes of the classifier in a weight file for timm model ``name`` (None when it
    cannot be told: no such key).

    timm drops a file's classifier whenever ``num_classes`` differs from the pretrained config's (1000
    for ImageNet models), which is right for hub weights but would throw away the head of the user's
    own 10-class checkpoint; with the file's real size in the config, a head of the size asked for
    (or of the file's size, when none is asked for) is loaded and another size gets a new head.
    """
    try:
        classifier = timm.models.get_pretrained_cfg(name).classifier
    except Exception:
        return None
    tensors = checkpoint_tensors(path) if tensors is None else tensors
    keys = [f"{c}.weight" for c in ((classifier,) if isinstance(classifier, str) else classifier or ())]
    shapes = [tensors[k][1] for k in keys if k in tensors]
    return int(shapes[0][0]) if shapes and len(shapes[0]) >= 1 else None


def new_head(name: str, checkpoint: str | Path | None, pretrained: bool, num_classes: int | str | None) -> bool:
    """Whether :func:`create_model` gave ``name`` a freshly initialised classifier: ``num_classes``
    differs from the head in the weights (none at all: everything is new, so is the head)."""
    if num_classes is None:
        return False
    if checkpoint is not None:
        return checkpoint_classes(Path(checkpoint).expanduser(), name) != int(num_classes)
    if pretrained:
        return timm.models.get_pretrained_cfg(name).num_classes != int(num_classes)
    return True


def describe_mismatch(err: BaseException) -> str:
    """One line out of ``load_state_dict``'s multi-line error: counts and an example of each problem."""
    text = str(err)
    parts = []
    for label, pattern in (
        ("missing", r"Missing key\(s\) in state_dict: (.*)"),
        ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)"),
    ):
        match = re.search(pattern, text)
        if match:
            keys = re.findall(r'"([^"]+)"', match.group(1))
            parts.append(f"{len(keys)} {label} keys (e.g. {excerpt(keys[0], bare=True)})" if keys else f"{label} keys")
    sizes = re.findall(r"size mismatch for ([^:]+):", text)
    if sizes:
        parts.append(f"{len(sizes)} shape mismatches (e.g. {excerpt(sizes[0], bare=True)})")
    return ", ".join(parts) or first_line(err)
