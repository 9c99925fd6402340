"""Fuse linears that share an input into one GEMM on weights concatenated once; the parameters become views.

Inductor does not do this for us (checked on torch 2.13 with the tiny Qwen3.5). Its pre-grad `batch_linear_lhs`
(off by default, and only for groups of 5 or more unless `min_fuse_set_size` is lowered) takes only 2-d inputs, so
it misses the MLP's gate/up on [1, T, D]; on the whole-graph inductor backend it fused the three GatedDeltaNet
qkv/a/b groups but emits `torch.cat` of the weights inside the graph: a copy of those weights on every call
(a `cpp_fused_..._cat_...` kernel writing a [136, 64] buffer before each mm). On hattn's pieces it fails ("Mixing
fake modes": its metadata is Dynamo's fakes). The post-grad `group_linear` is fbgemm's grouped GEMM (different
inputs, CUDA fbgemm only). `freezing=True` folds that cat once, but into a second copy of the weights that
`load_state_dict` no longer reaches. So this pass does it once, at compile time, without a second copy:

    n_groups = fuse_linears(gm, example_inputs)   # a Dynamo graph, before split_graph; mutates gm and the params

Each group of `linear(x, w_i, b_i)` becomes `linear(x, W, B).split([N_i...], dim=-1)[i]`, W (and B) a get_attr
buffer allocated once; every w_i (b_i) is rebound (`.data`) to its row slice of W, so the model holds one copy and
in-place updates of the parameters (`load_state_dict`) reach the fused GEMM. The outputs are column slices of the
fused output (row stride sum(N_i), as vLLM's qkv split). A linear joins a group when:
  - it is `F.linear` (`torch._C._nn.linear`, what Dynamo records) with weight (and bias) a placeholder whose
    example input is an `nn.Parameter` (2-d weight, 1-d bias), used by linears only, as their weight (bias): a
    weight read or mutated by other nodes is left alone;
  - it is inference: grad mode is off where it runs (at compile time, then as the graph's `_set_grad_enabled`
    nodes set it), or no weight or bias of it requires grad (the fused graph reads W, so gradients would never
    reach the parameters);
  - a column slice serves as well as its contiguous output: neither the output nor any alias of it (a view,
    chunk, index: a value sharing its storage) is returned by the graph (the caller's `.view(-1)` would fail),
    read by `as_strided` or by a custom op that may assume contiguous rows (`registry.reads_input_layout`: any but
    split ops registered with `strided_inputs=True`), or mutated (reshape, flatten and contiguous alias a
    contiguous output but copy a slice),
    and the aliases' ops run on a fake column slice as they did (a view merging rows with columns fails there);
  - the group shares the input node (so also dtype, device and K), biases are all absent or all present, and the
    weights (biases) have one dtype; a weight or bias appears once per group;
  - no node between the group's first and last linear may mutate the input (an in-place op, `inplace=True`,
    setitem, `out=`, a custom op with mutable arguments, a higher-order op such as a user's Triton kernel, whose
    tensor arguments share the input's storage; without fake-tensor metadata any such node counts) or change global
    state (grad mode, inference mode, autocast): the fused GEMM runs at the first linear's place, under the first
    linear's state.
W is then one of:
  - a view spanning the weights when they already are adjacent rows of one storage (a second Dynamo graph of the
    same model, e.g. the one-token graph): no copy, no rebinding;
  - a new buffer, when every weight is contiguous and the only tensor on its whole storage (no other graph input, no
    tensor outside the graph: rebinding would cut a tie); otherwise (tied by storage to another input or tensor,
    fused before in another order) the group is not fused (logged).
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._prims_common import make_contiguous_strides_for
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from hattn import registry
from hattn.passes.guards import GraphWrapper, grad_mode_switch, with_block_call
from hattn.runtime.graphs import data_ptrs_at, data_ptrs_equal

log = logging.getLogger("hattn")
FUSED_PREFIX = "_hattn_fused_"  # the fused buffers' names: FUSED_PREFIX + kind + "_" + index
FUSED_WEIGHT_PREFIX = FUSED_PREFIX + "weight_"


@dataclass
class _Linear:
    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None


def fuse_linears(gm: fx.GraphModule, example_inputs: list) -> int:
    """Fuse every group of same-input linears of `gm` (see the module docstring); return how many groups."""
    params = _placeholder_params(gm, example_inputs)
    fused = sum(_fuse_group(gm, group, params, example_inputs) for group in _groups(gm.graph, params))
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _placeholder_params(gm: fx.GraphModule, example_inputs: list) -> dict[fx.Node, torch.nn.Parameter]:
    placeholders = gm.graph.find_nodes(op="placeholder")
    return {n: x for n, x in zip(placeholders, example_inputs, strict=True) if isinstance(x, torch.nn.Parameter)}


def _linear_args(node: fx.Node) -> tuple | None:
    """(input, weight, bias) of a linear call node, or None for any other node."""
    if node.op != "call_function" or node.target is not F.linear:
        return None
    args = [*node.args, None, None, None][:3]  # F.linear(x, weight=w) names what it does not place
    return tuple(node.kwargs.get(name, arg) for name, arg in zip(("input", "weight", "bias"), args))


def _as_linear(node: fx.Node, params: dict, grad: bool, order: dict) -> _Linear | None:
    """`node` as a fusible linear where grad mode is `grad`, or None (see the module docstring's rules); `order`:
    each node's place in the graph."""
    args = _linear_args(node)
    if args is None:
        return None
    x, w, b = args
    if not _only_read_as(w, 1, 2, params) or (b is not None and not _only_read_as(b, 2, 1, params)):
        return None
    if grad and any(params[p].requires_grad for p in (w, b) if p is not None):
        return None
    if not _slice_serves(node, order):
        return None
    return _Linear(node, x, w, b)


_AS_STRIDED = (torch.as_strided, "as_strided", torch.ops.aten.as_strided.default)
_VIEWS = ("view", torch.Tensor.view, torch.ops.aten.view.default)


def _slice_serves(out: fx.Node, order: dict) -> bool:
    """Whether a column slice of a wider output (row stride > columns) can stand in for the linear output `out`.

    With fake-tensor metadata (Dynamo's graphs), over `out` and every node whose value shares its storage (its
    views, chunks, indexing): none is returned by the graph, read by `as_strided` or mutated (reshape, flatten and
    contiguous copy a slice where they alias a contiguous output), and each of them computes on a fake column slice
    as it did (a view that merges rows with columns fails there). Without metadata, the direct readers only."""
    if _value(out) is None:  # a view is not proven either
        return not any(_reads_the_layout(user) or user.target in _VIEWS for user in out.users)
    aliases = _aliases(out, order)
    for alias in aliases:
        for user in alias.users:
            if _reads_the_layout(user) or any(n in aliases for n in _written(user) or ()):
                return False
    return _replays_on_a_slice(out, aliases)


def _reads_the_layout(user: fx.Node) -> bool:
    """A graph output (the caller's `.view(-1)` would fail on a slice), `as_strided` (strides as given), or a custom
    op not registered as taking strided inputs (`registry.reads_input_layout`: a user's kernel may assume contiguous
    rows, as eager gives it)."""
    return user.op == "output" or user.target in _AS_STRIDED or registry.reads_input_layout(user.target)


def _aliases(out: fx.Node, order: dict) -> list[fx.Node]:
    """`out` and the nodes reached from it through users whose values share its storage, in graph order."""
    storage = _storages(out)
    found, todo = {out: None}, [out]
    while todo:
        for user in todo.pop().users:
            shared = _storages(user)
            if user not in found and shared is not None and not storage.isdisjoint(shared):
                found[user] = None
                todo.append(user)
    return sorted(found, key=order.__getitem__)


def _replays_on_a_slice(out: fx.Node, aliases: list[fx.Node]) -> bool:
    """Run the aliases' ops again on a fake column slice in place of `out` (their other arguments as traced)."""
    value = _value(out)
    mode = getattr(value, "fake_mode", None)
    if mode is None:
        return False
    *rows, cols = value.shape
    stride = make_contiguous_strides_for((*rows, cols + 1))  # a column slice of a wider output, as the fused GEMM's
    with mode:
        env = {out: torch.empty_strided(value.shape, stride, dtype=value.dtype, device=value.device)}
        for node in aliases[1:]:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n] if n in env else _value(n))
            try:
                if node.op == "call_method":
                    env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "call_function":
                    env[node] = node.target(*args, **kwargs)
                else:
                    return False
            except Exception:  # noqa: BLE001  (e.g. "view size is not compatible with input tensor's size")
                return False
    return True


def _value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _only_read_as(p, position: int, dim: int, params: dict) -> bool:
    """p is a `dim`-d parameter placeholder that every user is a linear reading it as argument `position` only."""
    if p not in params or params[p].dim() != dim:
        return False
    for user in p.users:
        args = _linear_args(user)
        if args is None or [i for i, a in enumerate(args) if a is p] != [position]:
            return False
    return True


def _groups(graph: fx.Graph, params: dict) -> list[list[_Linear]]:
    """Groups of two or more fusible linears, in graph order; a node that may mutate an input closes its group, one
    that changes grad mode, inference mode or autocast closes every group."""
    open_groups: dict[tuple, list[_Linear]] = {}
    closed: list[list[_Linear]] = []
    grad, outer = torch.is_grad_enabled(), []  # grad mode here, and outside each inference_mode block
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        linear = _as_linear(node, params, grad, order)
        if linear is not None:
            key = (linear.x, linear.bias is None)
            group = open_groups.setdefault(key, [])
            if all(lin.weight is not linear.weight and (lin.bias is None or lin.bias is not linear.bias)
                   for lin in group):
                group.append(linear)
        elif _changes_global_state(node):
            closed += open_groups.values()
            open_groups = {}
            name = node.target.__name__
            if name == "_set_grad_enabled":
                grad = bool(node.args[0])
            elif name == "_enter_inference_mode":
                outer.append(grad)
                grad = grad and not node.args[0]
            elif name == "_exit_inference_mode" and outer:
                grad = outer.pop()
        elif _may_mutate(node):
            for key in [k for k in open_groups if _may_alias(node, k[0])]:
                closed.append(open_groups.pop(key))
    return [g for g in closed + list(open_groups.values()) if len(g) > 1]


def _changes_global_state(node: fx.Node) -> bool:
    """What Dynamo records for `with torch.no_grad()` / `enable_grad()` (`_set_grad_enabled`), `torch.autocast`,
    `torch.inference_mode` and other context managers (`_enter_*` / `_exit_*` functions)."""
    return grad_mode_switch(node) or bool(with_block_call(node))


def _may_mutate(node: fx.Node) -> bool:
    """Whether `node` may write into one of its arguments (conservatively: any name ending in "_" counts)."""
    return _written(node) is not None


def _written(node: fx.Node) -> list[fx.Node] | None:
    """The arguments `node` may write, or None when it writes none: by the op's schema, the in-place method's self,
    `out=`; every input where that is not known (a module, a higher-order op such as a user's Triton kernel, an op
    with several overloads, one of them mutable)."""
    if node.op == "call_module":
        return list(node.all_input_nodes)
    if node.op not in ("call_function", "call_method"):
        return None
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return list(node.all_input_nodes)
    if isinstance(target, torch._ops.OpOverloadPacket):
        if target.overloads() != ["default"]:
            mutable = any(getattr(target, name)._schema.is_mutable for name in target.overloads())
            return list(node.all_input_nodes) if mutable else None
        target = target.default
    if isinstance(target, torch._ops.OpOverload):
        if not target._schema.is_mutable:
            return None
        written = [node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                   for i, arg in enumerate(target._schema.arguments)
                   if arg.alias_info is not None and arg.alias_info.is_write]
        return [n for n in tree_leaves(written) if isinstance(n, fx.Node)]
    if "out" in node.kwargs:
        return [n for n in tree_leaves(node.kwargs["out"]) if isinstance(n, fx.Node)]
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if target in _IN_PLACE_OPERATORS or name.endswith("_") or _in_place_flag(node):
        first = node.args[0] if node.args else node.kwargs.get("input")
        return [first] if isinstance(first, fx.Node) else list(node.all_input_nodes)
    return None


def _in_place_flag(node: fx.Node) -> bool:
    """F.relu(x, inplace=True) or F.relu(x, True): a function whose `inplace` argument is set (Dynamo records
    `nn.ReLU(inplace=True)` so too)."""
    position = _inplace_position(node.target)
    flag = node.args[position] if position is not None and len(node.args) > position else node.kwargs.get("inplace")
    return isinstance(flag, fx.Node) or bool(flag)  # inplace=1 too; a traced flag may be true


@functools.cache
def _inplace_position(target) -> int | None:
    try:
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return None
    return names.index("inplace") if "inplace" in names else None


_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.imatmul,
                       operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.ilshift,
                       operator.irshift, operator.iand, operator.ior, operator.ixor}


def _may_alias(node: fx.Node, x: fx.Node) -> bool:
    """Whether a tensor argument of `node` may share x's storage (always, when fake-tensor metadata is missing)."""
    storages = [_storages(n) for n in (x, *node.all_input_nodes)]
    if any(s is None for s in storages):
        return True
    return not storages[0].isdisjoint(set().union(*storages[1:]))


def _storages(node: fx.Node) -> set | None:
    """The storages of the tensors in node's example value (Dynamo's fakes), or None when it has none."""
    value = _value(node)
    if value is None:
        return None
    return {StorageWeakRef(t.untyped_storage()) for t in tree_leaves(value) if isinstance(t, torch.Tensor)}


def _fuse_group(gm: fx.GraphModule, group: list[_Linear], params: dict, example_inputs: list) -> bool:
    """Replace `group` by one linear on fused parameters and a split; False (reason logged) when it cannot."""
    weights = [params[lin.weight] for lin in group]
    biases = [params[lin.bias] for lin in group] if group[0].bias is not None else []
    reason = next(filter(None, (_unfusable(ts, example_inputs) for ts in (weights, biases) if ts)), None)
    if reason is not None:
        log.debug("hattn: linears %s not fused: %s", [lin.node.name for lin in group], reason)
        return False
    fused_bias = _fused(biases) if biases else None
    _emit(gm, group, [w.shape[0] for w in weights], _fused(weights), fused_bias)
    return True


def _unfusable(ts: list[torch.Tensor], example_inputs: list) -> str | None:
    """Why `ts` can be neither spanned nor concatenated, or None when they can."""
    if len({(t.dtype, t.device) for t in ts}) > 1:  # torch.cat would promote them: a parameter's dtype changed
        return f"parameters of different dtypes or devices: {sorted({str(t.dtype) for t in ts})}"
    if _span(ts) is not None:
        return None
    users = [StorageWeakRef(x.untyped_storage()) for x in example_inputs if isinstance(x, torch.Tensor)]
    for t in ts:
        ref = StorageWeakRef(t.untyped_storage())
        whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if not (t.is_contiguous() and whole and users.count(ref) == 1):
            return (f"a {tuple(t.shape)} parameter is not the sole owner of its whole storage (tied to another "
                    f"input, non-contiguous, or fused before in another order)")
        if _tensors_on(t.untyped_storage()) > 1:
            return (f"a {tuple(t.shape)} parameter shares its storage with a tensor outside the graph (a tied "
                    f"weight of another module, a view someone holds): rebinding it would cut that tie")
    return None


def _tensors_on(storage: torch.UntypedStorage) -> int:
    """How many tensors hold `storage` (its use count less the reference of the `storage` object itself)."""
    return torch._C._storage_Use_Count(storage._cdata) - 1


def _span(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """One view over `ts` when they are contiguous and follow each other in one storage, else None."""
    first = ts[0]
    ref, offset = StorageWeakRef(first.untyped_storage()), first.storage_offset()
    for t in ts:
        if not t.is_contiguous() or StorageWeakRef(t.untyped_storage()) != ref or t.storage_offset() != offset:
            return None
        offset += t.numel()
    shape = (sum(t.shape[0] for t in ts), *first.shape[1:])
    # made as `_fused` makes a new buffer (no grad, a normal tensor): the two ways of fusing (a first compile
    # concatenates, a compile after it spans) give pieces of one AOTAutograd cache key
    with torch.inference_mode(False), torch.no_grad():
        return first.detach().as_strided(shape, [math.prod(shape[i + 1:]) for i in range(len(shape))])


def _fused(ts: list[torch.Tensor]) -> torch.Tensor:
    """[sum N_i, ...]: the spanning view of `ts`, or a new buffer holding them with each t rebound to its rows."""
    span = _span(ts)
    if span is not None:
        return span
    # a normal tensor even under inference_mode: the parameters may be trained afterwards
    with torch.inference_mode(False), torch.no_grad():
        fused = torch.cat([t.detach() for t in ts])
        for t, rows in zip(ts, fused.split([t.shape[0] for t in ts])):
            t.data = rows
    return fused


def _emit(gm: fx.GraphModule, group: list[_Linear], sizes: list[int], weight: torch.Tensor,
          bias: torch.Tensor | None) -> None:
    """linear(x, weight, bias).split(sizes, dim=-1)[i] in place of the group's linears, at the first one's place."""
    graph = gm.graph
    with graph.inserting_before(group[0].node):
        w = graph.get_attr(_register(gm, "weight", weight))
        b = graph.get_attr(_register(gm, "bias", bias)) if bias is not None else None
        out = graph.call_function(F.linear, (group[0].x, w, b))
        parts = graph.call_function(torch.split, (out, sizes), {"dim": -1})
        outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(group))]
    for lin, part in zip(group, outs):
        part.meta.update(lin.node.meta)  # shapes and dtypes as before (a column slice: strides differ)
        lin.node.replace_all_uses_with(part)
        graph.erase_node(lin.node)


def _register(gm: fx.GraphModule, kind: str, t: torch.Tensor) -> str:
    i = 0
    while hasattr(gm, f"{FUSED_PREFIX}{kind}_{i}"):
        i += 1
    name = f"{FUSED_PREFIX}{kind}_{i}"
    assert kind != "weight" or name.startswith(FUSED_WEIGHT_PREFIX)
    gm.register_buffer(name, t, persistent=False)
    return name


class FusedWeightsMoved(RuntimeError):
    """A compiled graph with fused linears was called with parameters that are not the views of its fused buffers."""


class FusedWeightsGuard(GraphWrapper):
    """The compiled graph `fn`, called only while the parameters fused into its buffers still are (by storage
    address) the ones it fused. The fused GEMMs read the buffers, not the parameter inputs, so another model instance
    that Dynamo serves with this graph (two models of one class compiled with one backend, or with
    `backend="hattn"` and equal options) or a fused parameter given new storage (`p.data = ...`,
    `load_state_dict(assign=True)`) would get this graph's weights: an error instead. One C++ check per call where
    torch has it (CUDA builds)."""

    def __init__(self, fn, indices: list[int], example_inputs: list):
        self.fn, self.indices, self.ptrs = fn, indices, data_ptrs_at(example_inputs, indices)

    @classmethod
    def wrap(cls, fn, gm: fx.GraphModule, example_inputs: list):
        """`fn` guarded by the parameters `gm`'s fused buffers hold (fn itself when nothing was fused)."""
        buffers = {StorageWeakRef(t.untyped_storage()) for name, t in gm.named_buffers()
                   if name.startswith(FUSED_PREFIX)}
        indices = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)
                   and StorageWeakRef(x.untyped_storage()) in buffers]
        return cls(fn, indices, example_inputs) if indices else fn

    def __call__(self, *args):
        if not self._same(args):
            moved = next(i for i in self.indices if args[i].data_ptr() != self.ptrs[i])
            raise FusedWeightsMoved(
                f"hattn: graph input {moved}, a parameter fused into one GEMM with others at compile time "
                f"(fuse_linears), is not the tensor it fused: another model instance reached this compiled graph "
                f"(two models of one class compiled with one backend, or torch.compile(..., backend='hattn') with "
                f"equal options), or the parameter got new storage (p.data = ..., load_state_dict(assign=True), "
                f"model.to(...) after compile). Compile each model with its own backend (hattn.backend(...)) and "
                f"after moving it, update weights in place (load_state_dict without assign, p.data.copy_(...)), or "
                f"pass fuse_linears=False")
        return self.fn(*args)

    def _same(self, args) -> bool:
        same = data_ptrs_equal(args, self.ptrs, self.indices)
        return all(args[i].data_ptr() == self.ptrs[i] for i in self.indices) if same is None else same
