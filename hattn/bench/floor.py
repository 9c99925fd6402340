"""The floor of a row: the least time its work could take on this device, measured in the same run.

    floor_ms = max(bytes / copy bandwidth, flops / bf16 matmul peak)

Decode (issue 17): the bytes one step must move. The weights a step reads: every parameter except the input
embedding table (a step reads one row of it per token), the LM head included, counted once when it is tied to
the embedding. Full-attention layers read their KV cache: B x (context + 1) x kv_heads x (k_dim + v_dim) x element
size. Every other layer kind reads and writes each state tensor of its `LayerSpec` once per sequence. A
mixture-of-experts layer's routed experts (a module named `experts`, its parameters stacked over the experts, as
transformers 5 lays them out; shared experts count whole) count `num_experts_per_tok / num_experts` of their bytes:
a step reads at least top-k experts a layer, whatever the batch.

Prefill (issue 18): one read of those weights, and the FLOPs of the model's matmuls, 2 x parameters x tokens (routed
experts at their top-k share: each token runs k of them), with the LM head on each
sequence's last token only (all a sampler needs), plus causal attention of the full layers, 2 x Hq x (Dk + Dv) x
n(n+1)/2 a sequence of n tokens. The linear mixers' recurrences (a few MFLOP a token) and elementwise work are
left out: a floor may only be too low, never too high.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from hattn.bench.workloads import Point, generate_context
from hattn.context import LayerSpec


def _bytes(p) -> int:
    return p.numel() * p.element_size()


def routed_share(hf: nn.Module) -> dict[int, float]:
    """id(parameter) -> the share of it one token reads, for routed experts' stacked parameters (top-k / experts);
    parameters not listed are read whole. Empty for dense models and configs that do not say k and the count."""
    config = hf.config.get_text_config()
    k = getattr(config, "num_experts_per_tok", None)
    experts = next((getattr(config, name) for name in ("num_experts", "num_local_experts", "n_routed_experts")
                    if isinstance(getattr(config, name, None), int)), None)
    if not k or not experts or k >= experts:
        return {}
    return {id(p): k / experts for name, module in hf.named_modules() if name.rsplit(".", 1)[-1] == "experts"
            for p in module.parameters() if p.dim() >= 1 and p.shape[0] == experts}


def decode_weight_bytes(hf: nn.Module) -> int:
    """Bytes of the parameters a decode step reads: all but the input embedding (unless the LM head is it), routed
    experts at their top-k share."""
    emb = hf.get_input_embeddings().weight
    head = hf.get_output_embeddings()
    tied = head is not None and head.weight is emb
    share = routed_share(hf)
    return int(sum(_bytes(p) * share.get(id(p), 1.0) for p in hf.parameters() if p is not emb or tied))


def state_bytes(specs: dict[int, LayerSpec], batch: int, context: int, elem: int) -> int:
    """KV-cache reads of `batch` sequences at `context` cached tokens, plus state read + write of the others."""
    total = 0
    for spec in specs.values():
        if spec.kv is not None:
            heads, k_dim, v_dim = spec.kv
            total += batch * (context + 1) * heads * (k_dim + v_dim) * elem
        for shape, dtype in spec.states:
            numel = 1
            for n in shape:
                numel *= n
            total += 2 * batch * numel * (dtype.itemsize if dtype is not None else elem)
    return total


def prefill_flops(hf: nn.Module, specs: dict[int, LayerSpec], tokens: int, seqs: int, q_heads: int) -> int:
    """Matmul FLOPs of a prefill of `seqs` sequences of tokens/seqs tokens each (empty cache)."""
    emb, head = hf.get_input_embeddings().weight, hf.get_output_embeddings().weight
    share = routed_share(hf)
    body = int(sum(p.numel() * share.get(id(p), 1.0) for p in hf.parameters() if p is not emb and p is not head))
    n = tokens // seqs
    attention = sum(2 * q_heads * (s.kv[1] + s.kv[2]) * n * (n + 1) // 2 for s in specs.values() if s.kv)
    return 2 * body * tokens + 2 * head.numel() * seqs + seqs * attention


def with_floor(points: list[Point], lm) -> list[Point]:
    """The model suite's points with their bytes (decode, per-token, prefill rows) and FLOPs (prefill) filled in.

    lm: a HybridLM (`lm.hf`, `lm.cache_specs()`). A per-token row's step sits at context prompt + new_tokens / 2,
    the middle of its generation."""
    hf, specs = lm.hf, lm.cache_specs()
    elem = next(hf.parameters()).element_size()
    weights = decode_weight_bytes(hf)
    out = []
    for p in points:
        if p.kind == "decode":
            p = dataclasses.replace(p, bytes=weights + state_bytes(specs, p.batch, p.context, elem))
        elif p.kind == "per_token":
            ctx = generate_context(p.prompt, p.new_tokens)
            p = dataclasses.replace(p, bytes=weights + state_bytes(specs, p.batch, ctx, elem))
        elif p.kind == "prefill":
            flops = prefill_flops(hf, specs, p.tokens, p.seqs, lm.config.num_attention_heads)
            p = dataclasses.replace(p, bytes=weights, flops=flops)
        out.append(p)
    return out


def floor_ms(row: dict, bandwidth: float | None, matmul_flops: float | None) -> tuple[float | None, str | None]:
    """(floor in ms, "memory" or "compute": which bound sets it) of a point dict; (None, None) when unknown."""
    parts = {}
    if row.get("bytes") and bandwidth:
        parts["memory"] = row["bytes"] / bandwidth * 1e3
    if row.get("flops") and matmul_flops:
        parts["compute"] = row["flops"] / matmul_flops * 1e3
    if not parts:
        return None, None
    bound = max(parts, key=parts.get)
    return parts[bound], bound
