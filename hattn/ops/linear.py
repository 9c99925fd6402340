"""Kind "linear": the gated-delta-net core (Qwen3.5, Qwen3-Next, OLMo hybrid), `hattn::linear_attention`:
causal conv1d (silu) with its state update + the gated delta rule, states in each sequence's cache slot.

On CUDA with Triton a decode batch is one fused, capture-safe step; anything else is the packed prefill (our conv
+ fla's chunked rule, or its torch reference without fla). On CPU the per-sequence torch references run.
Kernels: `hattn/kernels/gated_delta/` and `hattn/kernels/conv1d/`.
"""
from __future__ import annotations

import torch

from hattn import registry
from hattn.context import (CaptureUnsupported, ForwardContext, LayerSpec, op_context, sequence_states,
                           zero_padding)
from hattn.kernels.conv1d.reference import causal_conv1d
from hattn.kernels.gated_delta.chunk import fla_chunk
from hattn.kernels.gated_delta.decode import gated_delta_triton, linear_attention_decode
from hattn.kernels.gated_delta.reference import recurrent_gated_delta_rule
from hattn.kernels.launch import use_triton
from hattn.kernels.packing import PackedBatch
from hattn.ops.packed_runner import DecodeRunner, PackedRunner, Runners


def cache_spec(conv_dim: int, kernel: int, v_heads: int, k_dim: int, v_dim: int, kind: str = "linear") -> LayerSpec:
    """Conv state [conv_dim, kernel-1] (model dtype) + recurrent state [v_heads, k_dim, v_dim] fp32 per slot.
    `kind`: another kind with the same two states (KDA)."""
    return LayerSpec(kind, states=(((conv_dim, kernel - 1), None), ((v_heads, k_dim, v_dim), torch.float32)))


def _linear_attention(
    mixed_qkv: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    g: torch.Tensor,
    beta: torch.Tensor,
    out: torch.Tensor,
    layer_id: int,
    num_k_heads: int,
    head_k_dim: int,
) -> None:
    """mixed_qkv: [T, 2*Hk*Dk + Hv*Dv] (before the conv); conv_weight: [C, W]; g (log decay), beta: [T, Hv];
    out: [T, Hv, Dv]. q/k are L2-normalised inside, as Qwen3.5/Qwen3-Next do."""
    ctx = op_context("linear", layer_id, mixed_qkv.shape[0])
    if ctx.captured:  # the whole step is one CUDA graph: device metadata only, padding at the scratch slot
        return _captured(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id, num_k_heads, head_k_dim, ctx)
    n = ctx.num_tokens
    if n < mixed_qkv.shape[0]:  # padding rows (a capture size's): the step's rows only; else no slicing (~1 us each)
        mixed_qkv, g, beta, out_rows = mixed_qkv[:n], g[:n], beta[:n], out[:n]
    else:
        out_rows = out
    args = (mixed_qkv, conv_weight, conv_bias, g, beta, out_rows, layer_id, num_k_heads, head_k_dim, ctx)
    if use_triton(mixed_qkv) and gated_delta_triton(head_k_dim, out.shape[2]):
        _cuda(*args)
    else:
        _per_sequence(*args)
    zero_padding(out, n)


def _captured(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id, num_k_heads, head_k_dim, ctx) -> None:
    states, packed = ctx.cache.state(layer_id), ctx.static.packed
    if packed is None:  # a decode step: one row per sequence
        slots, lens = ctx.device_meta(mixed_qkv.device)
        return linear_attention_decode(mixed_qkv, conv_weight, conv_bias, g, beta, out, *states, slots,
                                       num_k_heads, head_k_dim, lens)
    if not (use_triton(mixed_qkv) and gated_delta_triton(head_k_dim, out.shape[2]) and fla_chunk() is not None):
        raise CaptureUnsupported("a packed gated-delta step in a CUDA graph needs Triton, flash-linear-attention "
                                 "and head dims that are powers of two >= 16")
    from hattn.kernels.gated_delta.packed import linear_attention_packed  # needs triton: CUDA installs only

    linear_attention_packed(mixed_qkv, conv_weight, conv_bias, g, beta, out, states, packed.batch, num_k_heads,
                            head_k_dim, real_tokens=packed.fields["real_tokens"])
    zero_padding(out, packed.fields["real_tokens"])


def _cuda(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id, num_k_heads, head_k_dim, ctx) -> None:
    """A decode batch is one fused Triton step; anything else is the packed prefill (Triton conv + the recurrent
    kernel where every sequence is short, else fla's chunked rule)."""
    states = ctx.cache.state(layer_id) if ctx.cache is not None else None
    if ctx.is_decode:
        conv_state, rec_state, slots, lens = None, None, None, None  # no cache: zero states, nothing kept
        if states is not None:
            (conv_state, rec_state), (slots, lens) = states, ctx.device_meta(mixed_qkv.device)
        linear_attention_decode(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots,
                                num_k_heads, head_k_dim, lens, eager=True)
        return
    from hattn.kernels.gated_delta.packed import linear_attention_packed  # needs triton: CUDA installs only

    linear_attention_packed(mixed_qkv, conv_weight, conv_bias, g, beta, out, states,
                            packed_batch(ctx, mixed_qkv.device), num_k_heads, head_k_dim)


def packed_batch(ctx: ForwardContext, device) -> PackedBatch:
    """The step's packed prefill metadata, built by its first linear-attention layer and shared by the others."""
    return ctx.memo(("packed_batch", str(device)), lambda: PackedBatch.build(
        ctx.seq_lens, device, ctx.slots if ctx.cache is not None else None, ctx.context_lens))


def _per_sequence(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id, num_k_heads, head_k_dim, ctx) -> None:
    hv, dv = out.shape[1], out.shape[2]
    key_dim = num_k_heads * head_k_dim

    def fresh():
        conv = mixed_qkv.new_zeros(mixed_qkv.shape[1], conv_weight.shape[1] - 1, dtype=conv_weight.dtype)
        return conv, mixed_qkv.new_zeros(hv, head_k_dim, dv, dtype=torch.float32)

    for rows, (conv_state, rec_state) in sequence_states(ctx, layer_id, fresh):
        n = rows.stop - rows.start
        x = causal_conv1d(mixed_qkv[rows], conv_weight, conv_bias, conv_state)
        q, k, v = x.split([key_dim, key_dim, hv * dv], dim=-1)
        out[rows] = recurrent_gated_delta_rule(
            q.reshape(n, num_k_heads, head_k_dim), k.reshape(n, num_k_heads, head_k_dim), v.reshape(n, hv, dv),
            g[rows], beta[rows], rec_state,
        )


def _prepare(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id, num_k_heads, head_k_dim):
    """A call site run again and again with these arguments (bcg, pcg): its decode steps a CUDA graph of one prepared
    launch (`fused_decode.prepared_decode`, `DecodeRunner`), its packed steps one of the kernels above
    (`PackedRunner`)."""
    if not (use_triton(mixed_qkv) and gated_delta_triton(head_k_dim, out.shape[2])):
        return None
    from hattn.kernels.gated_delta.fused_decode import prepared_decode  # triton: CUDA installs only
    from hattn.kernels.gated_delta.packed import PackedForm, exact_form, linear_attention_packed

    def plan(n, ctx, slots, lens):
        conv_state, rec_state = ctx.cache.state(layer_id)
        return prepared_decode(mixed_qkv[:n], conv_weight, conv_bias, g[:n], beta[:n], out[:n], conv_state, rec_state,
                               slots, num_k_heads, head_k_dim, lens)

    def form(ctx) -> PackedForm | None:
        """The kernels `_cuda` runs for this step (`exact_form` of its batch): a graph runs the same, same blocks.
        One per step and shape, shared by the step's layers."""
        def of_batch():
            form = exact_form([n for n in ctx.seq_lens if n], *out.shape[1:])
            return form if form.recurrent or fla_chunk() is not None else None
        return ctx.memo(("linear", "packed_form", *out.shape[1:]), of_batch)

    def packed(cache, step, form: PackedForm) -> None:
        real = step.fields["real_tokens"]  # the recurrent form skips the padding rows (however long), zeroed here
        linear_attention_packed(mixed_qkv, conv_weight, conv_bias, g, beta, out, cache.state(layer_id), step.batch,
                                num_k_heads, head_k_dim, form, real)
        zero_padding(out, real)
    return Runners(DecodeRunner("linear", layer_id, out, plan), PackedRunner("linear", layer_id, out, form, packed))


linear_attention = torch.library.custom_op("hattn::linear_attention", mutates_args=("out",))(_linear_attention)


@linear_attention.register_fake
def _(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id, num_k_heads, head_k_dim) -> None:
    return None


registry.register_split_op(linear_attention, "linear", capture_safe=True, direct=_linear_attention, prepare=_prepare,
                          strided_inputs=True)
