"""A small hybrid model that calls hattn's split ops directly: the spine's test subject and the runtime's.

Layers follow `pattern` ("full" / "linear"), each: RMSNorm -> mixer -> residual -> RMSNorm -> MLP -> residual.
Shapes follow Qwen3.5's layers (gated attention output, GQA; gated-delta-net linear layers), at toy sizes.
Input: token ids [T] (sequences packed; the forward context says where each starts). Output: logits [T, vocab].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import hattn.ops  # noqa: F401  (defines torch.ops.hattn.*)
from hattn.models.cache import HybridCache
from hattn.ops import full, linear


@dataclass
class ToyConfig:
    vocab: int = 128
    hidden: int = 64
    pattern: list[str] = field(default_factory=lambda: ["linear", "linear", "linear", "full"])
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    k_heads: int = 2  # linear layers: key heads
    v_heads: int = 4  # linear layers: value heads (a multiple of k_heads)
    k_dim: int = 16
    v_dim: int = 16
    conv_kernel: int = 4
    intermediate: int = 128

    def layer_kinds(self) -> dict[int, str]:
        return dict(enumerate(self.pattern))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class FullAttention(nn.Module):
    def __init__(self, c: ToyConfig, layer_id: int):
        super().__init__()
        self.layer_id, self.c = layer_id, c
        self.q_proj = nn.Linear(c.hidden, 2 * c.heads * c.head_dim, bias=False)  # query and output gate
        self.kv_proj = nn.Linear(c.hidden, 2 * c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)

    def forward(self, x):  # x: [T, hidden]
        c, t = self.c, x.shape[0]
        q, gate = self.q_proj(x).chunk(2, dim=-1)
        k, v = self.kv_proj(x).view(t, 2, c.kv_heads, c.head_dim).unbind(1)
        q = q.reshape(t, c.heads, c.head_dim)
        out = torch.empty_like(q)
        torch.ops.hattn.full_attention(q, k.contiguous(), v.contiguous(), out, self.layer_id, c.head_dim**-0.5)
        return self.o_proj(out.reshape(t, -1) * torch.sigmoid(gate))


class GatedDeltaNet(nn.Module):
    def __init__(self, c: ToyConfig, layer_id: int):
        super().__init__()
        self.layer_id, self.c = layer_id, c
        self.conv_dim = 2 * c.k_heads * c.k_dim + c.v_heads * c.v_dim
        self.in_proj = nn.Linear(c.hidden, self.conv_dim + c.v_heads * c.v_dim + 2 * c.v_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.randn(self.conv_dim, c.conv_kernel) * 0.3)
        self.A_log = nn.Parameter(torch.log(torch.empty(c.v_heads).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(torch.ones(c.v_heads))
        self.norm = RMSNorm(c.v_dim)
        self.out_proj = nn.Linear(c.v_heads * c.v_dim, c.hidden, bias=False)

    def forward(self, x):  # x: [T, hidden]
        c, t = self.c, x.shape[0]
        mixed_qkv, z, b, a = self.in_proj(x).split([self.conv_dim, c.v_heads * c.v_dim, c.v_heads, c.v_heads], -1)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        out = x.new_empty(t, c.v_heads, c.v_dim)
        torch.ops.hattn.linear_attention(
            mixed_qkv, self.conv_weight, None, g, beta, out, self.layer_id, c.k_heads, c.k_dim
        )
        y = self.norm(out) * F.silu(z.reshape(t, c.v_heads, c.v_dim))
        return self.out_proj(y.reshape(t, -1))


MIXERS = {"full": FullAttention, "linear": GatedDeltaNet}


class MLP(nn.Module):
    def __init__(self, c: ToyConfig):
        super().__init__()
        self.gate_up = nn.Linear(c.hidden, 2 * c.intermediate, bias=False)
        self.down = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, c: ToyConfig):
        super().__init__()
        self.norm1, self.mixer, self.norm2, self.mlp = RMSNorm(c.hidden), mixer, RMSNorm(c.hidden), MLP(c)

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyHybridModel(nn.Module):
    def __init__(self, c: ToyConfig, mixers: dict[str, type[nn.Module]] | None = None):
        super().__init__()
        mixers = {**MIXERS, **(mixers or {})}
        unknown = sorted(set(c.pattern) - set(mixers))
        if unknown:
            raise ValueError(f"layer kinds {unknown} have no mixer; known kinds: {sorted(mixers)}")
        self.config = c
        self.embed = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(Block(mixers[kind](c, i), c) for i, kind in enumerate(c.pattern))
        self.norm = RMSNorm(c.hidden)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False)

    def forward(self, input_ids):  # input_ids: [T]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def toy_model(seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu", **overrides) -> ToyHybridModel:
    """A ToyHybridModel with fixed-seed random weights."""
    torch.manual_seed(seed)
    return ToyHybridModel(ToyConfig(**overrides)).to(device=device, dtype=dtype).eval()


def toy_cache(c: ToyConfig, slots: int, max_len: int, dtype: torch.dtype = torch.float32, device="cpu") -> HybridCache:
    """A HybridCache with one layer cache per layer of `c`: KV for full layers, conv + recurrent state for linear."""
    conv_dim = 2 * c.k_heads * c.k_dim + c.v_heads * c.v_dim
    specs = {i: full.cache_spec(c.kv_heads, c.head_dim) if k == "full" else
             linear.cache_spec(conv_dim, c.conv_kernel, c.v_heads, c.k_dim, c.v_dim) for i, k in enumerate(c.pattern)}
    return HybridCache(specs, slots, max_len, dtype, device)
