"""The artifact folder, in the Hugging Face shape: :func:`save_pretrained` and :func:`from_pretrained`.

A PEFT user saves a folder (``adapter_config.json``, ``adapter_model.safetensors``, ``README.md`` with the
Hub's model-card metadata) and a Hub repository *is* such a folder. retrofit's folder::

    out/
      config.json                  what rebuilds the model: format, kind (model or adapter), the retrofit
                                   version, the architecture and its constructor arguments, the recipe,
                                   the input size, the number of blocks, where the weights came from,
                                   and for an adapter its base (name, sha256 over the tensors it takes
                                   from it, their number)
      model.safetensors            every tensor (a full model), or
      adapter_model.safetensors    the blocks and what changed (an adapter; :mod:`retrofit.files.adapter`)
      README.md                    the model card, with the Hub's YAML metadata block (library_name:
                                   retrofit, tags, base_model and license when known)

The folder uploads to the Hub as it is (``huggingface_hub.upload_folder(folder_path="out", repo_id=...)``);
retrofit itself takes no Hub ids: nothing here touches a network.

``config.json`` is data, never code (:mod:`retrofit.files.folder` reads it): bounded, strict JSON, its keys
allow-listed, every value through the same checks, allow-lists and bounds as a single file's safetensors
metadata; nothing is built before all of it is checked, and every tensor's name, dtype and shape is
checked against the rebuilt model before any is loaded.

**Writes.** Each file is written atomically (:mod:`retrofit.files.atomic`), and ``config.json`` is the
folder's commit: written last, and removed first when a folder is written again. A kill at any moment
leaves the old folder whole, a folder without ``config.json`` (refused by :func:`from_pretrained` as
incomplete), or the new folder whole, never a config next to weights it does not describe.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file, save_model
from torch import nn

from ..errors import RetrofitError
from ..surgery.info import get_info, update_info
from .adapter import adapter_tensors, load_adapter
from .atomic import atomic_write, check_writable
from .card import card_lines, write_text
from .folder import ADAPTER_FILE, CARD_FILE, CONFIG_FILE, MODEL_FILE, config_of, header_of, read_folder
from .full import load_full
from .header import Header, metadata
from .tensors import read_safetensors_header


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    *,
    adapter: bool = False,
    base: Any = None,
    overhead: Any = None,
    result: Any = None,
    command: str | None = None,
    base_name: str | None = None,
) -> Path:
    """Write a retrofitted ``model`` to the folder ``directory`` (created as by ``mkdir -p``): ``config.json``,
    ``model.safetensors`` (or, with ``adapter``, ``adapter_model.safetensors``) and ``README.md``, its card.

    Args:
        model: a retrofitted model (:func:`retrofit.add_se`, ``retrofit.create_model``...).
        directory: the folder; files of a folder saved there before are replaced (the other kind's weights
            file too), other files are left alone.
        adapter: write only the inserted blocks, the base tensors that differ from the base and a new head,
            with a hash of the base (:mod:`retrofit.files.adapter`); :func:`from_pretrained` with ``base=``
            rebuilds the full model.
        base: for an adapter, the base to compare with (an ``nn.Module`` or a weight file); default: the
            base recorded on the model (when it was first fine-tuned, loaded, or saved as an adapter), else
            its current weights.
        overhead: a :class:`retrofit.Overhead` for the card's overhead table.
        result: a :class:`retrofit.FinetuneResult` for the card's fine-tuning table.
        command: the command line that made it, for the card.
        base_name: what the base is, for a full model's card (an adapter records its own).

    Returns:
        ``directory``.

    Raises:
        RetrofitError: not a retrofitted model, a size outside the bounds a file may hold, a path that is
            a file, or a failed write (``WriteError``: the folder is left without ``config.json``).

    Example::

        >>> retrofit.save_pretrained(se_model, "se50/")                  # config.json, model.safetensors, README.md
        PosixPath('se50')
        >>> sorted(p.name for p in retrofit.save_pretrained(se_model, "se50-adapter/", adapter=True).iterdir())
        ['README.md', 'adapter_model.safetensors', 'config.json']
    """
    folder = Path(directory).expanduser()
    if folder.exists() and not folder.is_dir():
        raise RetrofitError(f"{folder} is a file; save_pretrained writes a folder (give a folder path)")
    weights = folder / (ADAPTER_FILE if adapter else MODEL_FILE)
    check_writable(weights)
    if adapter:
        tensors, meta = adapter_tensors(model, base)
    else:
        meta = metadata(model)
    config = config_of(meta, get_info(model))
    (folder / CONFIG_FILE).unlink(missing_ok=True)  # the commit goes first: from here the folder is incomplete
    with atomic_write(weights) as tmp:
        if adapter:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        else:
            save_model(model, str(tmp), metadata={"format": "pt"})
    header = header_of(config, folder / CONFIG_FILE, weights, read_safetensors_header(weights)[1])
    card = card_text(
        header, folder, weights, model, config, overhead=overhead, result=result, command=command, base_name=base_name
    )
    write_text(folder / CARD_FILE, card, weights.name)
    with atomic_write(folder / CONFIG_FILE) as tmp:  # the commit
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    (folder / (MODEL_FILE if adapter else ADAPTER_FILE)).unlink(missing_ok=True)  # the other kind's, if any
    return folder


def from_pretrained(directory: str | Path, base: Any = None, *, force: bool = False) -> nn.Module:
    """Rebuild the model of a folder written by :func:`save_pretrained`.

    Args:
        directory: the folder (``config.json`` and its weights file).
        base: for an adapter, the base it was made on: a weight file (plain, a retrofit file or folder) or an
            ``nn.Module`` (copied, not changed); for a full model of a network that is not from timm, the
            plain network to rebuild on (an ``nn.Module``, copied). Not needed otherwise.
        force: rebuild an adapter on a base whose hash differs (a warning instead of an error).

    Raises:
        RetrofitError: a missing, incomplete, damaged or tampered folder (a ``config.json`` too large, not
            JSON, with keys or values retrofit does not write, outside the bounds a file may ask for; tensors
            whose names, dtypes or shapes do not fit), or the wrong base.

    Example::

        >>> folder = retrofit.save_pretrained(se_model, "se50/")
        >>> adapter = retrofit.save_pretrained(se_model, "se50-adapter/", adapter=True)
        >>> model = retrofit.from_pretrained("se50/")
        >>> model = retrofit.from_pretrained("se50-adapter/", base="my_resnet50.safetensors")
        >>> len(retrofit.get_info(model).blocks)
        16
    """
    header, extra = read_folder(directory)
    return rebuild_from(header, base, force=force, extra=extra)


def rebuild_from(header: Header, base: Any, *, force: bool, extra: Mapping[str, str] | None = None) -> nn.Module:
    """The model of a checked ``header`` (a folder's or a single file's), on ``base`` (see :func:`from_pretrained`)."""
    if header.adapter:
        model = load_adapter(header, base, force=force)
    else:
        if base is not None and not isinstance(base, nn.Module):
            raise RetrofitError(
                f"{header.path} is a full model: it holds every weight and needs no base weights "
                f"(base= takes the plain network, an nn.Module, for a network that is not from timm)"
            )
        model = load_full(header, copy.deepcopy(base) if base is not None else None)
    if extra:
        update_info(model, **extra)
    return model


def card_text(
    header: Header, folder: Path, weights: Path, model: nn.Module, config: Mapping[str, Any], **tables: Any
) -> str:
    """``README.md``: the Hub's YAML metadata block, then the card of :mod:`retrofit.files.card`."""
    data: dict[str, Any] = {"library_name": "retrofit"}
    if config.get("base_model"):
        data["base_model"] = config["base_model"]
    if config.get("license"):
        data["license"] = config["license"]
    tags = ["retrofit", "squeeze-and-excitation", "image-classification"]
    tags += ["timm"] if header.architecture else []
    tags += ["adapter"] if header.adapter else []
    data["tags"] = tags
    if header.architecture:
        data["pipeline_tag"] = "image-classification"
    # hand-written front matter rather than huggingface_hub's ModelCard: that is no dependency of retrofit, and
    # the block is YAML between two '---' lines (the tests read it back with huggingface_hub's own parser)
    front = "---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n\n"
    load = (
        f'retrofit.from_pretrained("{folder.name}", base="BASE_WEIGHTS")  # or base=the base nn.Module'
        if header.adapter
        else f'retrofit.from_pretrained("{folder.name}")'
        if header.architecture
        else f'retrofit.from_pretrained("{folder.name}", base=MyNet())  # the plain network'
    )
    lines = card_lines(
        header, folder.name, weights.name, weights.stat().st_size, load, model=model, target=f"{folder.name}/", **tables
    )
    return front + "\n".join(lines) + "\n"
