"""The tensors of a weight file, read from its header and checked against a model before any is loaded.

Names, dtypes (safetensors' names: ``F32``, ``I64``...) and shapes come from the header alone, so a
file is judged before its data is read: an unknown or missing name, a wrong shape, or an integer
tensor relabelled as a float (and the reverse) is refused in one line. A float tensor may come at
another float precision (a model saved in half precision loads into float32).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ..errors import RetrofitError, excerpt, first_line
from ..inputs import open_regular
from .bounds import HEADER_BYTES, TENSORS

# safetensors' names of the torch dtypes; a float tensor may be stored at another float precision (a
# model saved in half precision loads into float32), any other tensor must have its exact type
DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
FLOAT_DTYPES = {name for dtype, name in DTYPE_NAMES.items() if dtype.is_floating_point}
EXACT_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items() if not dtype.is_floating_point}


class HeaderBound(ValueError):
    """A safetensors header larger than a weight file's may be (:func:`check_header_size`)."""


def safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The metadata and each tensor's (dtype name, shape) of a safetensors file: its header only, once
    its size and number of entries are within :data:`~retrofit.files.bounds.HEADER_BYTES` and
    :data:`~retrofit.files.bounds.TENSORS` (:class:`HeaderBound` if not): a header of a million tensors
    is refused from its first bytes, not after parsing it whole (seconds and gigabytes)."""
    check_header_size(path)
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}, {
            k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()
        }


def check_header_size(path: Path) -> None:
    """Refuse (:class:`HeaderBound`) a safetensors header of more than :data:`~retrofit.files.bounds.HEADER_BYTES`
    bytes, from the length its first 8 bytes give, or of more than :data:`~retrofit.files.bounds.TENSORS`
    tensors (``"data_offsets"`` counted in the raw bytes: every tensor entry has one); a file shorter
    than the header it declares is no complete safetensors file (``ValueError``)."""
    with os.fdopen(open_regular(path, "file"), "rb") as f:
        head, total = f.read(8), os.fstat(f.fileno()).st_size
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        if len(head) < 8 or 8 + size > total:
            raise ValueError(f"its first 8 bytes declare a header of {size:,} bytes, the file has {total:,}")
        if size > HEADER_BYTES:
            raise HeaderBound(
                f"its safetensors header declares {size:,} bytes, more than the {HEADER_BYTES:,} a weight file may have"
            )
        count = f.read(size).count(b'"data_offsets"')
    if count > TENSORS:
        raise HeaderBound(
            f"its safetensors header lists {count:,} tensors, more than the {TENSORS:,} a weight file may have"
        )


def read_safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """:func:`safetensors_header`, a file that is not complete safetensors one line."""
    try:
        return safetensors_header(path)
    except HeaderBound as err:
        raise RetrofitError(f"cannot read {excerpt(path)}: {err}; is it a weight file?") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise RetrofitError(
            f"cannot read {excerpt(path)}: not a complete safetensors file ({first_line(err)})"
        ) from None


def load_into(
    model: nn.Module, path: str | Path, *, tensors: Mapping | None = None, required: Iterable[str] | None = None
) -> None:
    """Load the tensors of a safetensors file into ``model`` after checking each one's name, dtype and
    shape against ``model.state_dict()``: no unknown name, no missing one (of ``required``: default every
    key of the model; a key that shares its storage with a key in the file counts as present).
    ``tensors``: the file's header, when it was read already."""
    path = Path(path)
    tensors = read_safetensors_header(path)[1] if tensors is None else tensors
    check_tensors(model, tensors, path, required)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise RetrofitError(f"cannot read {excerpt(path)}: {first_line(err)}") from None
    model.load_state_dict(with_metadata(state, model), strict=False)  # every name, dtype and shape checked above


def with_metadata(state: Mapping[str, torch.Tensor], model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """``state`` with the per-module ``_metadata`` of ``model``'s own ``state_dict()`` (each module's
    state-dict ``version``). A safetensors file, or a dict copied key by key, has none, and a module
    whose ``_load_from_state_dict`` reads its version refuses ``None`` (torchvision's MNASNet: "version
    should be set to 1 or 2"). Retrofit wrote the weights from the code they are loaded into, so the
    versions are its own; one read from a file is never used (a file is data)."""
    out = OrderedDict(state)
    out._metadata = getattr(model.state_dict(), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return out


def check_tensors(
    model: nn.Module,
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    where: Path | str,
    required: Iterable[str] | None = None,
) -> None:
    """Refuse (one line: counts and an example of each problem) tensors that do not fit ``model``."""
    state = model.state_dict()
    unexpected = [k for k in tensors if k not in state]
    aliases = alias_groups(state)
    required = state.keys() if required is None else required
    missing = [k for k in required if not any(a in tensors for a in aliases.get(k, (k,)))]
    shapes, dtypes = [], []
    for key, (dtype, shape) in tensors.items():
        have = state.get(key)
        if have is None:
            continue
        if tuple(have.shape) != tuple(shape):
            shapes.append((key, f"{excerpt(list(shape))} in the file, {list(have.shape)} in the model"))
        elif not dtype_fits(dtype, have.dtype):
            dtypes.append((key, f"{dtype} in the file, {str(have.dtype).replace('torch.', '')} in the model"))
    problems = []
    for label, found in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
        ("dtype mismatches", dtypes),
    ):
        if found:
            key, detail = found[0] if isinstance(found[0], tuple) else (found[0], "")
            problems.append(f"{len(found)} {label} (e.g. {excerpt(key, bare=True)}{detail and ': ' + detail})")
    if problems:
        raise RetrofitError(
            f"weights in {excerpt(where, bare=True)} do not fit the rebuilt model: {', '.join(problems)}"
        )


def dtype_fits(stored: str, wanted: torch.dtype) -> bool:
    """A float tensor from any float precision; an integer or bool tensor only from its own type."""
    if wanted.is_floating_point:
        return stored in FLOAT_DTYPES
    return EXACT_DTYPES.get(stored) == wanted


def alias_groups(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, ...]]:
    """Keys that share one storage (tied weights): safetensors writes one name of each group."""
    groups: dict[tuple, list[str]] = {}
    for key, value in state.items():
        if value.device.type != "meta" and value.numel():
            groups.setdefault((value.device, value.untyped_storage().data_ptr(), value.shape), []).append(key)
    return {k: tuple(g) for g in groups.values() if len(g) > 1 for k in g}


def dtype_name(dtype) -> str:
    """safetensors' name of a torch dtype (``F32``, ``I64``...)."""
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
