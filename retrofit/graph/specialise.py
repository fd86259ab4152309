"""A rewritten forward that follows its module's attributes: derived again when they change.

A rewritten forward is fx code, and fx code is specialised to the Python values the forward read while
it was traced: a Swin block's window size, shift and tokens per window are constants in it, and so is
the branch ``if has_shift:`` took. timm's own API changes such values: ``model.set_input_size(img_size=
(288, 288))`` gives every Swin block a new window and turns the last stage's shift off. A forward that
kept the old values would fail, or worse, compute something else.

So each installed forward remembers what it was traced with (:class:`~retrofit.graph.forward.Specialisation`):
the attributes of its module that the class's forward names (:func:`retrofit.graph.code.names_read`;
plain values by value, parameters, buffers and submodules by whether they are None), checked before
every call by one generated comparison. When one has changed, :func:`respecialise` traces the
module's class forward again, one level deep, with the values it has now; aligns the new graph with
the one the blocks are in, as the two modes of a forward are aligned
(:class:`~retrofit.graph.two_modes.Correspondence`: a roll that is no longer made is a node without a
counterpart); puts each block back before the counterparts of what read it; and installs the result.
The model then computes what the original computes after the same call, the blocks included. A block
whose readers have no counterpart in the new forward is a :class:`~retrofit.errors.RetrofitError`
naming what changed, never another computation.

Values a rewritten forward gets from elsewhere follow on their own: a tensor its parent passes is an
input (:class:`~retrofit.graph.rebuild.OwnerGraph`), and a child module keeps its own forward.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch import fx, nn

from ..errors import RetrofitError, first_line
from . import nodes as N
from .code import names_read
from .forward import INSTALLED, GraphForward, Specialisation, class_forward, observe, plain
from .rebuild import CONSTANT_PREFIX, CannotRewrite, OwnerGraph, splice_blocks
from .two_modes import Correspondence, reads_training, trace_one_level

_INTERNAL = frozenset(vars(nn.Module())) | set(INSTALLED)  # nn.Module's own machinery (training, hooks...)
# Attributes that change how a forward computes, not what: timm's gradient checkpointing recomputes the
# same function. A forward traced without it keeps computing the same values (without the memory saving),
# where tracing torch.utils.checkpoint again would fail.
NOT_WATCHED = frozenset({"grad_checkpointing"})


def watched(module: nn.Module) -> tuple[tuple[str, int], ...]:
    """(name, where) of the attributes of ``module`` its class forward names: 0, a plain value in its
    ``__dict__``; 1, 2, 3, a parameter, buffer or submodule (see :func:`retrofit.graph.forward.observe`)."""
    d = module.__dict__
    places = (d, d["_parameters"], d["_buffers"], d["_modules"])
    found = []
    for name in sorted(names_read(type(module)) - _INTERNAL - NOT_WATCHED):
        kind = next((k for k, where in enumerate(places) if name in where), None)
        if kind is not None and (kind or plain(d[name])):
            found.append((name, kind))
    return tuple(found)


def specialisation(module: nn.Module, blocks: tuple[str, ...], was_none: tuple[str, ...] = ()) -> Specialisation:
    """What the forward about to be installed on ``module`` (holding ``blocks``) depends on, now."""
    names = watched(module)
    return Specialisation(names, observe(module, names), tuple(blocks), tuple(was_none), respecialise)


def respecialise(module: nn.Module, holder: GraphForward) -> GraphForward:
    """Derive ``module``'s forward again for the attribute values it has now, with the blocks of
    ``holder``'s forward where they were; install it and return its holder.

    Raises:
        RetrofitError: the class forward cannot be traced with the new values, or a block has no
            place in it.
    """
    spec = holder.specialised
    try:
        with torch.inference_mode(False):  # a first call under inference_mode: constants fit for training too
            graphs, constants = _derive(module, holder)
    except CannotRewrite as err:
        changed = "; ".join(spec.changed(module)) or "its attributes"
        raise RetrofitError(
            f"{type(module).__name__} was retrofitted for other values of {changed}, and its "
            f"blocks have no place in its forward for the new ones ({err}); retrofit the model "
            f"after the change (retrofit.strip, then retrofit.add_se)"
        ) from None
    used = {n.target for g in graphs.values() for n in g.nodes if n.op == "get_attr"}
    for name, _ in list(module.named_buffers(recurse=False)):  # the old forward's constants, if unused now
        if name.startswith(CONSTANT_PREFIX) and name not in used and name not in constants:
            delattr(module, name)
    with torch.inference_mode(False):
        for name, tensor in constants.items():
            module.register_buffer(name, tensor.clone(), persistent=False)
    fresh = GraphForward(module, graphs, specialised=specialisation(module, spec.blocks, spec.was_none))
    fresh.install()
    return fresh


def _derive(module: nn.Module, holder: GraphForward) -> tuple[dict[bool, fx.Graph], dict]:
    """The forward's graphs (by mode) traced again, the blocks put back; and the new constants."""
    spec = holder.specialised
    modes = (True, False) if reads_training(type(module)) else (module.training,)
    graphs, constants = {}, {}
    with class_forward(module), _as_before(module, spec.was_none):
        for mode in modes:
            try:
                fresh = trace_one_level(module, mode)
            except Exception as err:  # fx raises many kinds
                raise CannotRewrite(f"its forward cannot be traced ({first_line(err)})") from None
            rebuilt = OwnerGraph(fresh.root_call, fresh, frozenset(constants))
            _put_back(holder.graphs[mode], rebuilt, spec.blocks)
            constants.update(rebuilt.constants)
            graphs[mode] = rebuilt.graph
    if len(modes) == 1:
        graphs[not modes[0]] = graphs[modes[0]]
    return graphs, constants


@contextlib.contextmanager
def _as_before(module: nn.Module, was_none: tuple[str, ...]):
    """Within: the blocks that took the place of a None attribute are None again, as the class forward
    expects (timm's ``if self.se is not None``)."""
    saved = {name: module._modules[name] for name in was_none if name in module._modules}
    try:
        for name in saved:
            module._modules[name] = None
        yield
    finally:
        module._modules.update(saved)


def _put_back(old: fx.Graph, new: OwnerGraph, blocks: tuple[str, ...]) -> None:
    """Splice ``blocks`` into ``new`` where they are in ``old``: before the counterparts of the nodes
    that read each one (a block fused with its residual sum: in place of the sum's counterpart)."""
    inputs = {n.name: n for n in old.nodes if n.op == "placeholder"}
    for n in new.graph.nodes:
        if n.op == "placeholder":
            if n.name not in inputs:
                raise CannotRewrite(f"its forward takes other inputs ({n.name})")
            n.type, n.args = inputs[n.name].type, inputs[n.name].args  # one signature: the rebuilt one
    plain_graph, order, held = _without(old, blocks)
    match = Correspondence(plain_graph, new.graph)
    made: dict[str, fx.Node] = {}  # block name -> its node in the new graph
    for name in order:
        source, value, readers, add = held[name]
        twins = [match.get(r) for r in readers]
        if not twins or None in twins:
            raise CannotRewrite(f"what reads block {name} has no counterpart")
        if source is not None:  # the output of a block before it
            found = {made[source]}
        else:
            found = {_twin_input(match, r, t, value) for r, t in zip(readers, twins)}
        if len(found) != 1 or None in found:
            raise CannotRewrite(f"the input of block {name} has no counterpart")
        twin = found.pop()
        if add is not None and (N.add_operands(twins[0]) is None or twin not in N.add_operands(twins[0])):
            raise CannotRewrite(f"the sum block {name} is fused with has no counterpart")
        splice_blocks(
            new, [(twin, None if add is not None else twins)], [name], [twins[0] if add is not None else None]
        )
        made[name] = next(n for n in new.graph.nodes if n.op == "call_module" and n.target == name)
    new.graph.lint()


def _without(old: fx.Graph, blocks: tuple[str, ...]) -> tuple[fx.Graph, list[str], dict]:
    """A copy of ``old`` with its blocks taken out (a fused one becomes the plain sum again), the
    blocks in the order they run, and for each: the block whose output it reads (or None), its input in
    the copy, the nodes of the copy that read what it made (through any blocks after it), and the
    sum a fused one stood for."""
    plain_graph, copies = fx.Graph(), {}
    plain_graph.graph_copy(old, copies)
    nodes = [n for n in old.nodes if n.op == "call_module" and n.target in blocks]
    held = {}
    for n in reversed(nodes):  # later blocks first: their readers become the earlier ones'
        node = copies[n]
        first = n.args[0]
        source = (
            first.target
            if isinstance(first, fx.Node) and first.op == "call_module" and first.target in blocks
            else None
        )
        add = None
        if len(node.args) > 1:  # block(x, shortcut): the sum it replaced
            with plain_graph.inserting_before(node):
                add = plain_graph.call_function(operator.add, tuple(node.args[:2]))
            node.replace_all_uses_with(add)
            readers = [add]
        else:
            readers = list(node.users)
            node.replace_all_uses_with(node.args[0])
        value = node.args[0]
        plain_graph.erase_node(node)
        held[n.target] = (source, value, readers, add)
    return plain_graph, [n.target for n in nodes], held


def _twin_input(match: Correspondence, reader: fx.Node, twin: fx.Node, value: fx.Node) -> fx.Node | None:
    """The input of ``twin`` (the counterpart of ``reader``) that stands where ``reader`` reads ``value``:
    ``value``'s counterpart if ``twin`` reads it, else the one input of ``twin`` that is no counterpart
    of ``reader``'s other inputs (a roll no longer made, or made now, between them)."""
    inputs = twin.all_input_nodes
    direct = match.get(value)
    if direct is not None and direct in inputs:
        return direct
    others = {match.get(i) for i in reader.all_input_nodes if i is not value}
    rest = [i for i in inputs if i not in others]
    return rest[0] if len(rest) == 1 else None
