"""Which inputs and outputs follow the token count, and padding them up to a capture size.

Graph runtimes replay graphs captured at fixed sizes: a call with T tokens runs at the smallest capture size
S >= T, with every token-dependent input zero-padded to S (padding rows are zeros, never uninitialised memory) and
every token-dependent output sliced back to T (and cloned, so the caller owns it).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch


@dataclass
class TokenLayout:
    """Token-dependent positions of a callable's flat inputs and outputs.

    in_dims[i]   the dims of tensor input i whose size is the token count ((): not token-dependent)
    in_ints      indices of int inputs that are the token count itself (Dynamo's SymInt placeholders)
    out_dims[j]  likewise for outputs; None = discover at run time (dims whose size equals the padded count)
    reason       why graphs cannot serve this callable (e.g. several dynamic sizes), or None
    """

    in_dims: list[tuple[int, ...]]
    in_ints: list[int] = field(default_factory=list)
    out_dims: list[tuple[int, ...]] | None = None
    reason: str | None = None

    def num_tokens(self, args) -> int:
        for i in self.in_ints:
            return int(args[i])
        for i, dims in enumerate(self.in_dims):
            if dims:
                return args[i].shape[dims[0]]
        raise ValueError("no input follows the token count; graphs need a token dimension to pad")

    @property
    def has_tokens(self) -> bool:
        return bool(self.in_ints) or any(self.in_dims)


def _sym_exprs(value) -> list:
    if isinstance(value, torch.SymInt):
        return [value.node.expr]
    if isinstance(value, torch.Tensor):
        return [s.node.expr for s in value.shape if isinstance(s, torch.SymInt)]
    return []


def _dims_of(value, symbol) -> tuple[int, ...]:
    if not isinstance(value, torch.Tensor):
        return ()
    return tuple(d for d, s in enumerate(value.shape) if isinstance(s, torch.SymInt) and s.node.expr == symbol)


def layout_from_examples(inputs: list, outputs: list) -> TokenLayout:
    """Layout of a Dynamo graph from its placeholders' and outputs' example values (fake, maybe symbolic)."""
    exprs = [e for v in list(inputs) + list(outputs) for e in _sym_exprs(v)]
    symbols = {s for e in exprs for s in e.free_symbols}
    if not symbols:  # a static graph: one fixed size, nothing to pad
        return TokenLayout(in_dims=[()] * len(inputs), out_dims=[()] * len(outputs))
    if len(symbols) > 1:
        return TokenLayout([()] * len(inputs), reason=f"the graph has several dynamic sizes {sorted(map(str, symbols))}")
    (symbol,) = symbols
    derived = sorted({str(e) for e in exprs if e != symbol})
    if derived:
        return TokenLayout([()] * len(inputs), reason=f"sizes derived from the token count ({', '.join(derived)})")
    ints = [i for i, v in enumerate(inputs) if isinstance(v, torch.SymInt)]
    return TokenLayout([_dims_of(v, symbol) for v in inputs], ints, [_dims_of(v, symbol) for v in outputs])


def layout_from_args(args, token_dim: int = 0) -> TokenLayout:
    """Layout of a plain callable: tensor args whose `token_dim` has the first tensor arg's size are token-dependent."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors:
        raise ValueError("a graph runner needs at least one tensor argument (its token dimension is padded)")
    n = tensors[0].shape[token_dim]
    dims = [(token_dim,) if isinstance(a, torch.Tensor) and a.dim() > token_dim and a.shape[token_dim] == n else ()
            for a in args]
    return TokenLayout(dims, out_dims=None)


def pick_size(sizes: list[int], num_tokens: int) -> int | None:
    """The smallest capture size >= num_tokens, or None above the largest."""
    i = bisect.bisect_left(sizes, num_tokens)
    return sizes[i] if i < len(sizes) else None


class StaticInputs:
    """Per-size static buffers of the token-dependent inputs; other inputs pass through unchanged."""

    def __init__(self, layout: TokenLayout):
        self.layout = layout
        self.buffers: dict[int, list] = {}

    def fill(self, size: int, args, num_tokens: int) -> list:
        """args with token-dependent tensors copied into the size's zero-padded static buffers."""
        bufs = self.buffers.get(size)
        if bufs is None:
            bufs = self.buffers[size] = [_new_buffer(a, dims, size) for a, dims in zip(args, self.layout.in_dims)]
        out = list(args)
        for i, dims in enumerate(self.layout.in_dims):
            if dims:
                _copy_padded(bufs[i], args[i], dims, num_tokens)
                out[i] = bufs[i]
        for i in self.layout.in_ints:
            out[i] = size
        return out


def _new_buffer(arg, dims: tuple[int, ...], size: int):
    if not dims:
        return None
    shape = list(arg.shape)
    for d in dims:
        shape[d] = size
    return torch.zeros(shape, dtype=arg.dtype, device=arg.device)


def _copy_padded(buf: torch.Tensor, arg: torch.Tensor, dims: tuple[int, ...], n: int) -> None:
    if arg.dtype != buf.dtype or arg.device != buf.device:
        raise TypeError(
            f"a graph input changed from {buf.dtype} on {buf.device} to {arg.dtype} on {arg.device}; graphs were "
            f"captured for {buf.dtype} on {buf.device}: pass inputs of that dtype and device (or recompile)"
        )
    view = buf
    for d in dims:
        view.narrow(d, n, buf.shape[d] - n).zero_()
        view, arg = view.narrow(d, 0, n), arg.narrow(d, 0, n)
    view.copy_(arg)


def unpad_outputs(outputs, dims_list: list[tuple[int, ...]] | None, size: int, num_tokens: int):
    """Slice token dims back to num_tokens and clone every tensor (the caller owns what it gets)."""
    single = not isinstance(outputs, (tuple, list))
    outs = [outputs] if single else list(outputs)
    result = []
    for j, o in enumerate(outs):
        if isinstance(o, torch.Tensor):
            dims = dims_list[j] if dims_list is not None else tuple(d for d, s in enumerate(o.shape) if s == size)
            dims = dims if size != num_tokens else ()
            for d in dims:
                o = o.narrow(d, 0, num_tokens)
            o = o.clone()
        result.append(o)
    return result[0] if single else type(outputs)(result) if isinstance(outputs, tuple) else result
