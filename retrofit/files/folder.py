"""Reading a retrofit folder (:mod:`retrofit.files.pretrained`): its ``config.json``, as bounded data checked by
the same checks as a single file's metadata, and the :class:`~retrofit.files.header.Header` it makes.

``config.json`` is data, never code: read as a regular file of at most :data:`CONFIG_BYTES`, as JSON of bounded
depth (:mod:`retrofit.inputs`, the reader of every file the tool reads) with no NaN and no key twice, its
top-level keys against an allow-list, then every value through the checks, allow-lists and bounds of
:func:`retrofit.files.header.parse_metadata`: nothing is built before all of it is checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ..errors import RetrofitError, excerpt
from ..inputs import load_json, read_text
from .header import ADAPTER_FORMAT, FORMAT, Header, parse_metadata
from .tensors import read_safetensors_header

CONFIG_FILE, MODEL_FILE, ADAPTER_FILE, CARD_FILE = (
    "config.json",
    "model.safetensors",
    "adapter_model.safetensors",
    "README.md",
)
CONFIG_FORMAT = "retrofit-pretrained/1"
CONFIG_BYTES = 1 << 20  # a config is a few kB (a recipe with overrides); more is not one retrofit wrote
# config.json's top-level keys (any other is refused) and what each holds (docs/reference/file-format.md is made
# from these); those named as a file's metadata keys are checked as parse_metadata checks those
CONFIG = {
    "format": f"`{CONFIG_FORMAT}`",
    "kind": "`model` (the folder holds model.safetensors) or `adapter` (adapter_model.safetensors)",
    "retrofit_version": "the version of retrofit that wrote the folder",
    "architecture": "as the metadata key of that name",
    "model_kwargs": "as the metadata key, as a JSON object",
    "recipe": "as the metadata key, as a JSON object",
    "input_size": "as the metadata key, as a JSON list",
    "blocks": "as the metadata key, as a JSON number",
    "weights": "as the metadata key; absent when not known",
    "folds": "as the metadata key, as a JSON list; absent if none",
    "base": "an adapter's base: `{name, sha256, tensors}`, its metadata keys `base_name`, `base_sha256` and "
    "`base_tensors`",
    "base_model": "the Hugging Face Hub id of the pretrained weights the model was built on "
    "(`timm/resnet50.a1_in1k`), when known; the card names it",
    "license": "the license of those weights (timm's `pretrained_cfg`), when known",
}
CONFIG_KEYS = tuple(CONFIG)
JSON_KEYS = ("model_kwargs", "recipe", "input_size")  # values parse_metadata reads as JSON text
OPTIONAL_JSON_KEYS = ("folds",)  # the same, when the model has them (retrofit.fold's record)
BASE_KEYS = ("name", "sha256", "tensors")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9_.\-]{1,96}")
LICENSE = re.compile(r"[a-z0-9][a-z0-9.\-]{0,63}")


def config_of(meta: Mapping[str, str], info) -> dict[str, Any]:
    """``config.json`` of a file's metadata (:func:`retrofit.files.header.metadata`, an adapter's too)."""
    adapter = meta["format"] == ADAPTER_FORMAT
    config: dict[str, Any] = {
        "format": CONFIG_FORMAT,
        "kind": "adapter" if adapter else "model",
        "retrofit_version": version("retrofit"),
        "architecture": meta["architecture"],
        **{k: json.loads(meta[k]) for k in JSON_KEYS},
        "blocks": int(meta["blocks"]),
    }
    if "weights" in meta:
        config["weights"] = meta["weights"]
    config.update({k: json.loads(meta[k]) for k in OPTIONAL_JSON_KEYS if k in meta})
    if adapter:
        config["base"] = {
            "name": meta["base_name"],
            "sha256": meta["base_sha256"],
            "tensors": int(meta["base_tensors"]),
        }
    for key in ("base_model", "license"):
        if info is not None and getattr(info, key):
            config[key] = getattr(info, key)
    return config


def read_folder(directory: str | Path) -> tuple[Header, dict[str, str]]:
    """The checked :class:`~retrofit.files.header.Header` of a folder (its ``config.json`` and its weights
    file's tensor list; no tensor data is read), and what the folder records besides a single file's
    metadata: the Hub id and license of its weights (``base_model``, ``license``), when known."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise RetrofitError(f"{folder} is not a folder saved by retrofit.save_pretrained")
    path = folder / CONFIG_FILE
    if not path.exists() and not path.is_symlink():
        raise RetrofitError(
            f"{folder} has no {CONFIG_FILE}: not a folder written by retrofit.save_pretrained, or one "
            f"whose writing was interrupted; save it again"
        )
    config = read_config(path)
    weights = folder / (ADAPTER_FILE if config["kind"] == "adapter" else MODEL_FILE)
    if not weights.is_file():
        raise RetrofitError(
            f"{folder} has a {CONFIG_FILE} for "
            f"{'an adapter' if config['kind'] == 'adapter' else 'a model'} "
            f"but no {weights.name}; save it again"
        )
    extra = {key: config[key] for key in ("base_model", "license") if key in config}
    return header_of(config, path, weights, read_safetensors_header(weights)[1]), extra


def read_config(path: Path) -> dict[str, Any]:
    """``config.json``, read as bounded data: a regular file of at most :data:`CONFIG_BYTES`, strict JSON (no
    NaN or Infinity, no key twice), an object of the keys retrofit writes, each top-level value of its kind;
    the values themselves are checked by :func:`header_of`."""

    def bad(why: str) -> RetrofitError:
        return RetrofitError(f"{path}: {why}; the folder was not written by retrofit or was edited, save it again")

    text = read_text(path, "config", CONFIG_BYTES)  # a regular file (not a device, a FIFO...), bounded
    try:
        config = load_json(text, parse_constant=_no_constant, object_pairs_hook=_unique)
    except ValueError as err:  # not JSON, too deep, a key twice, NaN, a number of thousands of digits
        raise bad(str(err)) from None
    if not isinstance(config, dict):
        raise bad(f"must be a JSON object, got {type(config).__name__}")
    for key in config:
        if key not in CONFIG_KEYS:
            raise bad(f"key {excerpt(key)} is not one retrofit writes ({', '.join(CONFIG_KEYS)})")
    if config.get("format") != CONFIG_FORMAT:
        raise bad(f"'format' is {excerpt(config.get('format'))}, not '{CONFIG_FORMAT}'")
    if config.get("kind") not in ("model", "adapter"):
        raise bad(f"'kind' is {excerpt(config.get('kind'))}, not 'model' or 'adapter'")
    if ("base" in config) != (config["kind"] == "adapter"):
        raise bad("'base' must be given for an adapter, and only for one")
    base = config.get("base", dict.fromkeys(BASE_KEYS))
    if not isinstance(base, dict) or set(base) != set(BASE_KEYS):
        raise bad(f"'base' must be an object of {', '.join(BASE_KEYS)}")
    for key, pattern in (
        ("retrofit_version", re.compile(r"[0-9A-Za-z.+\-]{1,40}")),
        ("base_model", HUB_ID),
        ("license", LICENSE),
    ):
        if key in config and (not isinstance(config[key], str) or not pattern.fullmatch(config[key])):
            raise bad(f"'{key}' is {excerpt(config[key])}, not a {key.replace('_', ' ')}")
    return config


def header_of(config: Mapping[str, Any], where: Path, weights: Path, tensors) -> Header:
    """The :class:`~retrofit.files.header.Header` of a folder: ``config`` (its top level checked by
    :func:`read_config`) as the metadata a single file would hold, checked by the same
    :func:`~retrofit.files.header.parse_metadata`; ``weights`` is the file the tensors come from."""
    meta: dict[str, Any] = {"format": ADAPTER_FORMAT if config["kind"] == "adapter" else FORMAT}
    for key, value in config.items():
        if key in JSON_KEYS + OPTIONAL_JSON_KEYS:
            meta[key] = json.dumps(value)
        elif key in ("architecture", "blocks", "weights"):
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    if "base" in config:
        base = config["base"]
        meta.update(
            base_name=base["name"] if isinstance(base["name"], str) else json.dumps(base["name"]),
            base_sha256=base["sha256"] if isinstance(base["sha256"], str) else json.dumps(base["sha256"]),
            base_tensors=json.dumps(base["tensors"]),
        )
    return Header(path=weights, format=meta["format"], tensors=tensors, **parse_metadata(meta, str(where)))


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {excerpt(key)} is given twice")
        out[key] = value
    return out
