"""How each family's layers are sharded: a `Plan` per family, built from the primitives of `layers.py`.

transformers' own `tp_plan`s do not cover these models: they gather the linear-attention projections (every rank
computes every head), replicate OLMo's attention and have no entries for MLA, KDA, lightning or Mamba2. So each
mixer kind gets a function that shards it *by heads*: its input projections column-parallel (fused q|k|v cut per
part), conv1d channels, decay parameters and norms per local head, the module's head counts set to the local ones
(so the split op sees local shapes), the output projection row-parallel. MLPs are column- then row-parallel; an
MoE block's experts and shared experts are sharded on their intermediate dimension and the block output is
all-reduced once (the router stays whole: every rank routes the same tokens to the same experts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from hattn.parallel.group import TPGroup
from hattn.parallel.layers import colwise, reduce_output, rowwise, shard_norm, shard_param


@dataclass(frozen=True)
class Plan:
    """heads   config fields counting heads or groups: each must divide by tp; the local config divides them
    mixers  split-op kind -> shard(mixer module, tp)
    mlps    decoder layer -> its MLP and MoE blocks (each reduces its own output)"""

    heads: tuple[str, ...]
    mixers: dict[str, Callable[[nn.Module, TPGroup], None]]
    mlps: Callable[[nn.Module], list[nn.Module]] = field(default=lambda layer: _present(layer, "mlp"))


def _present(layer: nn.Module, *names: str) -> list[nn.Module]:
    """The layer's submodules `names` that it has (not None), in that order."""
    return [m for m in (getattr(layer, name, None) for name in names) if m is not None]


def _local(module: nn.Module, tp: TPGroup, *names: str) -> None:
    """Divide the module's head counts / widths `names` by tp (the forward then sees local shapes)."""
    for name in names:
        setattr(module, name, getattr(module, name) // tp.size)


def _shard_conv(conv: nn.Conv1d, tp: TPGroup, parts: list[int]) -> None:
    """A depthwise conv1d over channels made of `parts` (q | k | v, x | B | C): this rank's channels of each."""
    shard_param(conv, "weight", tp, 0, parts)
    if conv.bias is not None:
        shard_param(conv, "bias", tp, 0, parts)
    conv.in_channels = conv.out_channels = conv.groups = conv.weight.shape[0]


# -- full attention ------------------------------------------------------------------------------------------------
def gqa_attention(m: nn.Module, tp: TPGroup) -> None:
    """q/k/v by heads (Qwen's gated q_proj holds [q, gate] per head: still whole heads), o_proj (LFM2: out_proj)
    row-parallel. q/k norms over one head stay whole; norms over all heads (OLMo) become ShardedRMSNorm."""
    for name in ("q_proj", "k_proj", "v_proj"):
        colwise(getattr(m, name), tp)
    rowwise(m.o_proj if hasattr(m, "o_proj") else m.out_proj, tp)
    for name in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
        norm = getattr(m, name, None)
        if norm is not None and norm.weight.numel() != m.head_dim:
            shard_norm(norm, tp, weight_in_fp32=True)


def mla_attention(m: nn.Module, tp: TPGroup) -> None:
    """MLA (Kimi-Linear, bailing): the latent projections stay whole, q and the kv up-projection by heads."""
    colwise(m.q_proj if m.q_lora_rank is None else m.q_b_proj, tp)
    colwise(m.kv_b_proj, tp)
    if hasattr(m, "g_proj"):  # bailing's one output gate per head
        colwise(m.g_proj, tp)
    rowwise(m.o_proj, tp)
    _local(m, tp, "num_heads")


# -- gated delta net (kind "linear") -------------------------------------------------------------------------------
def _gdn_core(m: nn.Module, tp: TPGroup, out_proj: nn.Linear) -> None:
    """What every GatedDeltaNet shards alike: conv over q|k|v, per-head decay, output projection, head counts."""
    _shard_conv(m.conv1d, tp, [m.key_dim, m.key_dim, m.value_dim])
    shard_param(m, "A_log", tp)
    shard_param(m, "dt_bias", tp)
    rowwise(out_proj, tp)
    _local(m, tp, "num_k_heads", "num_v_heads", "key_dim", "value_dim", "conv_dim")


def qwen3_5_gdn(m: nn.Module, tp: TPGroup) -> None:
    """in_proj_qkv is [q | k | v]: cut per part; z, b, a by value heads."""
    colwise(m.in_proj_qkv, tp, [m.key_dim, m.key_dim, m.value_dim])
    for proj in (m.in_proj_z, m.in_proj_b, m.in_proj_a):
        colwise(proj, tp)
    _gdn_core(m, tp, m.out_proj)


def qwen3_next_gdn(m: nn.Module, tp: TPGroup) -> None:
    """in_proj_qkvz and in_proj_ba are grouped by key head ([q, k, v.., z..] per key head): contiguous blocks of
    key heads, with their value heads."""
    colwise(m.in_proj_qkvz, tp)
    colwise(m.in_proj_ba, tp)
    _gdn_core(m, tp, m.out_proj)


def olmo_gdn(m: nn.Module, tp: TPGroup) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj"):
        colwise(getattr(m, name), tp)
    _gdn_core(m, tp, m.o_proj)


# -- other mixers ----------------------------------------------------------------------------------------------------
def kda(m: nn.Module, tp: TPGroup) -> None:
    """Kimi delta attention: q/k/v, beta, the output gate's up-projection and the forget gate's by heads; the
    low-rank down-projections (f_a_proj, g_a_proj) stay whole."""
    for name in ("q_proj", "k_proj", "v_proj", "b_proj", "g_proj", "g_b_proj"):
        if hasattr(m, name):
            colwise(getattr(m, name), tp)
    _shard_conv(m.conv1d, tp, [m.qkv_dim] * 3)
    gate = m.forget_gate
    colwise(gate.f_proj if hasattr(gate, "f_proj") else gate.f_b_proj, tp)
    shard_param(gate, "dt_bias", tp)
    shard_param(gate, "A_log", tp, dim=2 if gate.A_log.dim() == 4 else 0)  # Kimi keeps A_log as [1, 1, H, 1]
    rowwise(m.o_proj, tp)
    _local(m, tp, "num_heads", "qkv_dim", "conv_dim")
    _local(gate, tp, "num_heads", "qkv_dim")


def lightning(m: nn.Module, tp: TPGroup) -> None:
    """MiniMax lightning attention: qkv_proj holds [q, k, v] per head; its norm spans every head."""
    colwise(m.qkv_proj, tp)
    colwise(m.output_gate, tp)
    shard_norm(m.norm, tp, weight_in_fp32=False)
    rowwise(m.out_proj, tp)
    for name, dim in (("slope_rate", 0), ("query_decay", 0), ("key_decay", 0), ("diagonal_decay", 1)):
        shard_param(m, name, tp, dim)
    _local(m, tp, "num_attention_heads")


def mamba2(m: nn.Module, tp: TPGroup) -> None:
    """A Mamba2 mixer (Nemotron-H, Granite 4.0-H, Bamba): in_proj is [gate | x | B | C | dt] (x, gate, dt by heads,
    B and C by groups); whole groups stay on one rank, so the gated group norm is local."""
    inner, bc = m.intermediate_size, m.n_groups * m.ssm_state_size
    colwise(m.in_proj, tp, [inner, inner, bc, bc, m.num_heads])
    _shard_conv(m.conv1d, tp, [inner, bc, bc])
    for name in ("A_log", "D", "dt_bias"):
        shard_param(m, name, tp)
    shard_param(m.norm, "weight", tp)
    rowwise(m.out_proj, tp)
    _local(m, tp, "num_heads", "intermediate_size", "n_groups", "conv_dim")


def short_conv(m: nn.Module, tp: TPGroup) -> None:
    """LFM2's gated short conv: in_proj is [B | C | x], each gating or convolving channel by channel, so all three,
    the conv's channels and out_proj's inputs are cut alike."""
    channels = m.conv.weight.shape[0]
    colwise(m.in_proj, tp, [channels] * 3)
    _shard_conv(m.conv, tp, [channels])
    rowwise(m.out_proj, tp)


# -- MLP and MoE -----------------------------------------------------------------------------------------------------
def dense_mlp(mlp: nn.Module, tp: TPGroup, reduce: bool = True) -> None:
    """gate/up column-parallel, down row-parallel (reduced here, or by the caller: a shared expert). Granite's
    MLP holds gate | up in one `input_linear` (cut per part) and down in `output_linear`; LFM2's are w1, w3, w2."""
    if hasattr(mlp, "input_linear"):
        colwise(mlp.input_linear, tp, [mlp.hidden_size] * 2)
        rowwise(mlp.output_linear, tp, reduce=reduce)
        mlp.hidden_size = mlp.output_linear.in_features
        return
    for name in ("gate_proj", "up_proj", "w1", "w3"):
        if hasattr(mlp, name):
            colwise(getattr(mlp, name), tp)
    rowwise(_down(mlp), tp, reduce=reduce)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = _down(mlp).in_features


EXPERT_PARAMS = {"gate_up_proj", "up_proj", "down_proj"}


def moe(block: nn.Module, tp: TPGroup) -> None:
    """Experts' and shared experts' intermediate dimension sharded, their partial sums reduced once at the block's
    output (the shared expert's sigmoid gate and the latent projection back are linear in them)."""
    experts = block.experts
    unknown = sorted(n for n, _ in experts.named_parameters() if n not in EXPERT_PARAMS)
    if unknown:
        raise ValueError(f"{type(experts).__name__} has parameters {unknown} the MoE plan does not shard "
                         f"(it knows {sorted(EXPERT_PARAMS)}): this MoE layout is not yet tensor-parallel")
    if hasattr(experts, "gate_up_proj"):  # [E, gate | up, hidden]
        shard_param(experts, "gate_up_proj", tp, 1, [experts.intermediate_dim] * 2)
    else:  # Nemotron-H's experts have no gate: [E, intermediate, hidden]
        shard_param(experts, "up_proj", tp, 1)
    shard_param(experts, "down_proj", tp, 2)
    _local(experts, tp, "intermediate_dim")
    for name in ("shared_expert", "shared_experts"):
        if hasattr(block, name):
            dense_mlp(getattr(block, name), tp, reduce=False)
    latent_out = getattr(block, "fc2_latent_proj", None)
    if isinstance(latent_out, nn.Linear) and latent_out.bias is not None and tp.rank != 0:
        latent_out.bias.data.zero_()  # applied to a partial sum: its bias must count once
    reduce_output(block, tp)


def check_mlp(mlp: nn.Module, where: str, size: int) -> str | None:
    """What keeps `mlp` (a dense MLP or an MoE block) from sharding over `size` ranks, or None; checked for every
    layer before any is sharded."""
    if hasattr(mlp, "experts"):
        experts = mlp.experts
        inter = experts.intermediate_dim
        if inter % size:
            return f"{where}.experts: intermediate size {inter} (moe_intermediate_size) does not divide over tp={size}"
        row = inter // size * experts.down_proj.element_size()
        if row % 16:  # torch's grouped_mm, which transformers' experts call, needs 16-byte aligned strides
            return (f"{where}.experts: intermediate size {inter} (moe_intermediate_size) over tp={size} leaves "
                    f"{inter // size} columns per rank, {row} bytes in {experts.down_proj.dtype}; the experts' "
                    f"grouped GEMM needs a multiple of 16 bytes")
        shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
        return check_mlp(shared, f"{where}.shared_expert", size) if shared is not None else None
    inter = _down(mlp).in_features
    if inter % size:
        field = "shared_intermediate_size" if hasattr(mlp, "input_linear") else "intermediate_size"  # Granite's
        return f"{where}: intermediate size {inter} ({field}) does not divide over tp={size}"
    return None


def _down(mlp: nn.Module) -> nn.Linear:
    """A dense MLP's down projection, by the names the families give it."""
    return next(getattr(mlp, name) for name in ("down_proj", "output_linear", "w2") if hasattr(mlp, name))


def mlp_block(mlp: nn.Module, tp: TPGroup) -> None:
    if hasattr(mlp, "experts"):
        moe(mlp, tp)
    else:
        dense_mlp(mlp, tp)


# -- the families ----------------------------------------------------------------------------------------------------
_GDN_HEADS = ("num_attention_heads", "num_key_value_heads", "linear_num_key_heads", "linear_num_value_heads")
_KDA = Plan(heads=("num_attention_heads", "linear_num_heads"), mixers={"full": mla_attention, "kda": kda})
_MAMBA_HEADS = ("num_attention_heads", "num_key_value_heads", "mamba_n_heads", "mamba_n_groups")

PLANS: dict[str, Plan] = {
    "qwen3_5": Plan(_GDN_HEADS, {"full": gqa_attention, "linear": qwen3_5_gdn}),
    "qwen3_next": Plan(_GDN_HEADS, {"full": gqa_attention, "linear": qwen3_next_gdn}),
    "olmo_hybrid": Plan(_GDN_HEADS, {"full": gqa_attention, "linear": olmo_gdn}),
    "kimi_linear": _KDA,
    "bailing_hybrid": _KDA,
    "minimax": Plan(("num_attention_heads", "num_key_value_heads"), {"full": gqa_attention, "lightning": lightning}),
    "nemotron_h": Plan(("num_attention_heads", "num_key_value_heads", "mamba_num_heads", "n_groups"),
                       {"full": gqa_attention, "mamba2": mamba2},
                       mlps=lambda layer: [layer.mixer] if layer.block_type in ("mlp", "moe") else []),
    "granitemoehybrid": Plan(_MAMBA_HEADS, {"full": gqa_attention, "mamba2": mamba2},
                             mlps=lambda layer: _present(layer, "block_sparse_moe", "shared_mlp")),
    "bamba": Plan(_MAMBA_HEADS, {"full": gqa_attention, "mamba2": mamba2},
                  mlps=lambda layer: _present(layer, "feed_forward")),
    # hidden_size: the short conv's channels, which its cache state counts, are cut too
    "lfm2": Plan(("num_attention_heads", "num_key_value_heads", "hidden_size"),
                 {"full": gqa_attention, "short_conv": short_conv}, mlps=lambda layer: _present(layer, "feed_forward")),
}


def plan_of(family: str) -> Plan:
    if family not in PLANS:
        raise ValueError(f"family {family!r} is not yet sharded for tensor parallelism (sharded: "
                         f"{', '.join(sorted(PLANS))}); run it with --tp 1, or add its Plan in "
                         f"hattn/parallel/plans.py")
    return PLANS[family]
