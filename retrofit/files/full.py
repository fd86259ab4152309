"""A full model file: the plain network rebuilt from the file's metadata, retrofitted by its recipe,
then its weights loaded after every tensor's name, dtype and shape is checked."""

from __future__ import annotations

from torch import nn

from ..errors import RetrofitError, excerpt
from ..surgery.fold import apply_folds
from ..surgery.info import get_info, update_info
from ..surgery.insert import add_se
from .header import Header
from .meta_check import check_model_file
from .models import create_model
from .tensors import load_into


def rebuild(header: Header, model: nn.Module | None = None) -> nn.Module:
    """The file's architecture (or ``model``), retrofitted with the file's recipe and its blocks folded as
    the file says: no weights loaded yet."""
    if model is None:
        if not header.architecture:
            raise RetrofitError(
                f"{excerpt(header.path)} holds a model that is not from timm: pass the plain network, "
                f"retrofit.load(path, base=MyNet())"
            )
        check_model_file(header.architecture, header.model_kwargs, header.tensors, header.path)  # on meta: no memory
        model = create_model(header.architecture, **header.model_kwargs)
    model = add_se(model, header.recipe, inplace=True, input_size=header.input_size)
    blocks = len(get_info(model).blocks)
    if blocks != header.blocks:
        raise RetrofitError(
            f"{excerpt(header.path)} says {header.blocks} blocks but its recipe gives "
            f"{blocks} on this model; is it the network it was saved from?"
        )
    update_info(model, weights=header.weights)  # where the file says its weights came from
    try:
        apply_folds(model, header.folds)
    except RetrofitError as err:
        raise RetrofitError(f"{excerpt(header.path)}: {err}") from None
    return model


def load_full(header: Header, model: nn.Module | None = None) -> nn.Module:
    """The model of the full file ``header`` describes (rebuilt on ``model``, a plain network, if given)."""
    model = rebuild(header, model)
    load_into(model, header.path, tensors=header.tensors)
    return model
