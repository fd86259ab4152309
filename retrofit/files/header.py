"""A retrofit file's metadata: what it must say to be rebuilt, and the checks before anything is built.

A file holds everything needed to rebuild the model besides its weights: the timm architecture (and
the constructor arguments that change shapes: ``num_classes``, ``in_chans``), the recipe and the input
size it was traced at, the number of blocks the recipe gives there, and (``folds``, when
:func:`retrofit.fold` folded some) which blocks were folded and where each went.

A file is data, never instructions: before anything is built from it, every metadata value is
checked for its type and against an allow-list (only the keys retrofit writes; constructor arguments
only ``num_classes`` and ``in_chans``, so a file cannot ask timm for a download or another file), and
every size-like value against the bounds of :mod:`retrofit.files.bounds`, so it cannot ask for any
amount of memory. A file that fails any check is refused with one line naming the problem. Retrofit
writes no file outside those bounds (:func:`metadata`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from torch import nn

from ..errors import RetrofitError, excerpt, first_line
from ..inputs import load_json, regular_file
from ..surgery.info import FOLD_KINDS, WEIGHTS, Folded, get_info
from ..surgery.recipe import Recipe
from .bounds import out_of_bounds, whole_number
from .tensors import read_safetensors_header

FORMAT = "retrofit/1"
ADAPTER_FORMAT = "retrofit-adapter/1"


# the metadata keys retrofit writes and what each holds (docs/reference/file-format.md is made from these); any other
# key is refused (see read_header). Every value is text: a "JSON" one is JSON in that text.
METADATA = {
    "format": f"`{FORMAT}` (a whole model) or `{ADAPTER_FORMAT}` (an adapter: the blocks and what changed)",
    "architecture": "the timm model name; empty for a network timm does not have (loaded with `model=`)",
    "model_kwargs": "JSON: the constructor arguments that change shapes, of `num_classes` and `in_chans` only",
    "recipe": "JSON: every field of the recipe (`retrofit.Recipe`)",
    "input_size": "JSON: `[C, H, W]`, the input the model was traced at",
    "blocks": "the number of blocks the recipe inserted",
}
BASE_NAME = 200  # characters of an adapter's base_name
# the keys an adapter adds
ADAPTER_METADATA = {
    "base_sha256": "64 hexadecimal digits: a SHA-256 over the base's tensors the adapter does not hold (each "
    "tensor's name, dtype, shape and bytes); another base is refused",
    "base_tensors": "how many tensors of the base the adapter relies on (those it does not hold)",
    "base_name": f"what the base was, for messages: one printable line of at most {BASE_NAME} characters",
}
# keys a file may lack (older versions did not write them)
OPTIONAL_METADATA = {
    "weights": f"where the weights came from: one of {', '.join(f'`{w}`' for w in WEIGHTS)}",
    "folds": "JSON: the blocks `retrofit.fold` folded, `[[block path, kind, neighbour path], ...]`, absent if none",
}
KEYS = tuple(METADATA)
ADAPTER_KEYS = KEYS + tuple(ADAPTER_METADATA)
OPTIONAL_KEYS = tuple(OPTIONAL_METADATA)
MAX_PATH = 500  # characters of a module path in `folds`


# constructor arguments a file may pass to timm.create_model (their bounds: retrofit.files.bounds):
# nothing that names a file, a url or a download (pretrained, pretrained_cfg_overlay, checkpoint_path...)
MODEL_KWARGS = ("num_classes", "in_chans")


def metadata(model: nn.Module) -> dict[str, str]:
    """What a file needs to rebuild ``model`` besides its weights: architecture, constructor arguments,
    recipe, input size (all strings, as safetensors metadata). Training checkpoints store it too.

    Raises:
        RetrofitError: a size outside the bounds a file may ask for (:mod:`retrofit.files.bounds`):
            retrofit would refuse to load the file, so it is not written.
    """
    info = get_info(model)
    if info is None:
        raise RetrofitError("this model has no SE blocks from retrofit; call retrofit.add_se first")
    kwargs = _model_kwargs(model, info.input_size)
    problem = size_problem(kwargs, list(info.input_size)) or ("blocks", out_of_bounds("blocks", info.built))
    if problem[1]:
        raise RetrofitError(f"cannot save this model: {problem[1]}, so retrofit.load would refuse the file")
    return {
        "format": FORMAT,
        "architecture": info.architecture or "",
        "model_kwargs": json.dumps(kwargs),
        "recipe": json.dumps(info.recipe.to_dict()),
        "input_size": json.dumps(list(info.input_size)),
        "blocks": str(info.built),
        **({"weights": info.weights} if info.weights in WEIGHTS else {}),
        **({"folds": json.dumps([[f.path, f.into, f.neighbour] for f in info.folds])} if info.folds else {}),
    }


@dataclass
class Header:
    """The checked metadata of a retrofit file and the name, dtype and shape of each of its tensors."""

    path: Path
    format: str
    architecture: str
    model_kwargs: dict[str, int]
    recipe: Recipe
    input_size: tuple[int, ...]
    blocks: int
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    base_sha256: str = ""
    base_tensors: int = 0
    base_name: str = ""
    weights: str = ""  # where the weights came from (retrofit.surgery.info.WEIGHTS); "": not recorded
    folds: list[Folded] = field(default_factory=list)  # the blocks retrofit.fold folded, in order

    @property
    def adapter(self) -> bool:
        return self.format == ADAPTER_FORMAT


def read_header(path: str | Path) -> Header:
    """Read and check the metadata and tensor list of a retrofit file (no tensor data is read)."""
    path = regular_file(path, "file")  # a directory, a FIFO, a device, a symlink loop: said as what it is
    meta, tensors = read_safetensors_header(path)
    if meta.get("format") not in (FORMAT, ADAPTER_FORMAT):
        raise RetrofitError(
            f"{excerpt(path)} is not a retrofit file (no '{FORMAT}' metadata); for plain weights "
            f"use `retrofit add-se MODEL --checkpoint {excerpt(path.name, bare=True)}`"
        )
    return Header(path=path, format=meta["format"], tensors=tensors, **parse_metadata(meta, str(path)))


def parse_metadata(meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The values of retrofit metadata, each checked for its type; anything else is refused.

    Returns the fields of :class:`Header` (``architecture``, ``model_kwargs``, ``recipe``...)."""

    def bad(key: str, why: str) -> RetrofitError:
        return RetrofitError(
            f"{excerpt(where, bare=True)}: metadata {excerpt(key)} {why}; the file was not written "
            f"by retrofit or was edited, rebuild it from its source"
        )

    required = ADAPTER_KEYS if meta.get("format") == ADAPTER_FORMAT else KEYS
    for key in meta:
        if key not in required + OPTIONAL_KEYS:
            raise bad(key, f"is not one retrofit writes ({', '.join(required + OPTIONAL_KEYS)})")
    for key in required:
        if key not in meta:
            raise bad(key, "is missing")
    for key in meta:
        if not isinstance(meta[key], str):
            raise bad(key, "is not text")
    if meta.get("weights", WEIGHTS[0]) not in WEIGHTS:
        raise bad("weights", f"is {excerpt(meta['weights'])}, not one of {', '.join(WEIGHTS)}")

    def json_value(key: str, kind: type, what: str):
        try:
            value = load_json(meta[key])  # its depth bounded before it is parsed
        except ValueError as err:
            raise bad(key, f"is {err}") from None
        if not isinstance(value, kind):
            raise bad(key, f"must be {what}, got {type(value).__name__}")
        return value

    out: dict[str, Any] = {}
    arch = meta["architecture"]
    if arch:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", arch) or not timm.is_model(arch):
            raise bad("architecture", f"{excerpt(arch)} is not a timm model name")
    out["architecture"], out["weights"] = arch, meta.get("weights", "")
    kwargs = json_value("model_kwargs", dict, "a mapping")
    for key in kwargs:
        if key not in MODEL_KWARGS:
            raise bad(
                "model_kwargs",
                f"names {excerpt(key)}: only {', '.join(MODEL_KWARGS)} are allowed (a "
                f"file may not ask for downloads or other files)",
            )
    size = json_value("input_size", list, "a list [C, H, W]")
    if len(size) != 3 or not all(_is_int(v) and v >= 1 for v in size):
        raise bad("input_size", f"must be three positive whole numbers [C, H, W], got {excerpt(size)}")
    problem = size_problem(kwargs, size)  # before anything is built from them
    if problem:
        raise bad(problem[0], f"gives {problem[1]}")
    if kwargs.get("in_chans", 3) != size[0]:
        raise bad("input_size", f"has {size[0]} channels but the model {kwargs.get('in_chans', 3)}")
    out["model_kwargs"], out["input_size"] = kwargs, tuple(size)
    recipe = json_value("recipe", dict, "a mapping of recipe fields")
    try:
        out["recipe"] = Recipe.from_dict(recipe, origin=f"recipe stored in {excerpt(where, bare=True)}")
    except RetrofitError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise bad("recipe", f"has a bad value ({first_line(err)})") from None
    for key in ("blocks", "base_tensors") if meta.get("format") == ADAPTER_FORMAT else ("blocks",):
        try:
            out[key] = whole_number(meta[key], key)
        except ValueError as err:
            raise bad(key, f"gives {err}") from None
    if "folds" in meta:
        out["folds"] = _folds(json_value("folds", list, "a list of [block, kind, neighbour]"), out["blocks"], bad)
    if meta.get("format") == ADAPTER_FORMAT:
        if not re.fullmatch(r"[0-9a-f]{64}", meta["base_sha256"]):
            raise bad("base_sha256", "must be 64 hexadecimal digits")
        if len(meta["base_name"]) > BASE_NAME or not meta["base_name"].isprintable():
            raise bad("base_name", f"must be one printable line of at most {BASE_NAME} characters")
        out.update(base_sha256=meta["base_sha256"], base_name=meta["base_name"])
    return out


def _folds(value: list, blocks: int, bad) -> list[Folded]:
    """The ``folds`` metadata as :class:`Folded` records, each entry checked (shape, kind, path lengths)."""
    if len(value) > blocks:
        raise bad("folds", f"lists {len(value)} folded blocks but the file has {blocks} blocks")
    folds, seen = [], set()
    for entry in value:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and all(isinstance(v, str) and len(v) <= MAX_PATH and v.isprintable() for v in entry)
        ):
            raise bad(
                "folds", f"has an entry that is not [block, kind, neighbour] (three short texts): {excerpt(entry)}"
            )
        path, into, neighbour = entry
        if into not in FOLD_KINDS:
            raise bad("folds", f"has the kind {excerpt(into)}, not one of {', '.join(FOLD_KINDS)}")
        if path in seen or not path or (into == "scale") != (neighbour == ""):
            raise bad("folds", f"has a bad entry for block {excerpt(path)}")
        seen.add(path)
        folds.append(Folded(path, into, neighbour))
    return folds


def size_problem(kwargs: Mapping[str, Any], size: list) -> tuple[str, str] | None:
    """The first of the constructor arguments and the input's sides (H, W of ``size``) outside its bound
    (:mod:`retrofit.files.bounds`): its metadata key and the clause that names the bound; None when
    all are within."""
    values = [("model_kwargs", k, v) for k, v in kwargs.items()] + [("input_size", "input side", v) for v in size[1:]]
    for key, name, value in values:
        problem = out_of_bounds(name, value)
        if problem:
            return key, problem
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _model_kwargs(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    if input_size and input_size[0] != 3:
        kwargs["in_chans"] = input_size[0]
    return kwargs
