"""A graph with attention-like compute (softmax of an activation product, a KV-cache write) and no split op: graph
modes refuse it, mode eager warns; a transformers model's graph names hattn.compile / hattn.adapt as the fix."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hattn
from hattn.models.presets import preset_config, random_model
from hattn.passes.guards import NoSplitOpError, NoSplitOpWarning, UnregisteredAttentionError

FIX = r"hattn.compile\(model\) \(or torch.compile\(hattn.adapt\(model\), backend='hattn'\)\).*register_split_op"


class EagerAttention(nn.Module):
    """Attention written out: softmax(q k^T * scale + mask) v, as transformers' "eager" implementation."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):  # x: [T, 16]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        mask = torch.full((x.shape[0], x.shape[0]), float("-inf")).triu(1)
        return F.softmax((q @ k.T) * 0.25 + mask, dim=-1, dtype=torch.float32) @ v


class Router(nn.Module):
    """A mixture-of-experts router: softmax of a linear layer (parameters x activations) is not attention."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 4)

    def forward(self, x):
        return F.softmax(self.gate(x), dim=-1).topk(2).values


class KVCacheWrite(nn.Module):
    """A gpt-fast style KV cache buffer written at the step's positions."""

    def __init__(self):
        super().__init__()
        self.k = nn.Linear(16, 16)
        self.register_buffer("k_cache", torch.zeros(32, 16))

    def forward(self, x, pos):
        self.k_cache.index_copy_(0, pos, self.k(x))
        return self.k_cache.sum(0)


class MatmulRouter(nn.Module):
    """A router written as a product with its own weight (`x @ self.w`): one activation in the product."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 4))

    def forward(self, x):
        return F.softmax(x @ self.w, dim=-1).topk(2).values


class FilledKeys(nn.Module):
    """Attention whose keys are added into a buffer it made (`add_`, an in-place op not in the writes' list)."""

    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(16, 32)

    def forward(self, x):
        q, k = self.qk(x).chunk(2, dim=-1)
        keys = torch.zeros(x.shape[0], 16)
        keys.add_(k)
        return F.softmax(q @ keys.T, dim=-1)


class ConstantWrite(nn.Module):
    """Writes a constant into an input (a flag, a counter): no activation is written, not a KV cache."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x, buf):
        buf[0] = 0.0
        return self.lin(x) + buf.sum()


def _compile(module, mode):
    return torch.compile(module, backend=hattn.backend(mode=mode, inner_compiler="eager"))


@pytest.mark.parametrize("mode", ["pcg", "bcg", "full"])
@pytest.mark.parametrize("module", [EagerAttention, FilledKeys])
def test_graph_modes_refuse_attention_written_out(mode, module):
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="softmax of an activation product") as err:
        _compile(module(), mode)(torch.randn(5, 16))
    inner = err.value.inner_exception
    assert type(inner) is NoSplitOpError and isinstance(inner, UnregisteredAttentionError)
    msg = str(inner)
    assert f"mode {mode!r} would capture the model's own attention" in msg and "test_no_split_op.py" in msg
    assert "no hattn split op (node 'softmax'" in msg


def test_graph_modes_refuse_a_kv_cache_write():
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=FIX) as err:
        _compile(KVCacheWrite(), "pcg")(torch.randn(3, 16), torch.tensor([4, 5, 6]))
    assert type(err.value.inner_exception) is NoSplitOpError
    assert "a KV-cache write into graph input" in str(err.value.inner_exception) and "index_copy_" in str(err.value)


def test_mode_eager_runs_it_and_warns():
    module, x = EagerAttention(), torch.randn(5, 16)
    with pytest.warns(NoSplitOpWarning, match="mode 'eager' runs it as it is, without hattn's attention or cache"):
        out = _compile(module, "eager")(x)
    torch.testing.assert_close(out, module(x))


@pytest.mark.parametrize("mode", ["pcg", "eager"])
@pytest.mark.parametrize("router", [Router, MatmulRouter])
def test_a_router_softmax_is_not_attention(mode, router, recwarn):
    module, x = router(), torch.randn(5, 16)
    torch.testing.assert_close(_compile(module, mode)(x), module(x))
    assert not [w for w in recwarn if issubclass(w.category, NoSplitOpWarning)]


def test_a_constant_written_into_an_input_is_not_a_kv_cache_write():
    module, x = ConstantWrite(), torch.randn(5, 16)
    got, want = torch.ones(4), torch.ones(4)
    torch.testing.assert_close(_compile(module, "pcg")(x, got), module(x, want))
    assert torch.equal(got, want)


def test_transformers_eager_attention_names_hattn_compile():
    hf = random_model(preset_config("tiny"))
    hf.set_attn_implementation("eager")
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as err:
        _compile(hf, "pcg")(torch.tensor([[1, 2, 3, 4]]), use_cache=False)
    inner = err.value.inner_exception
    assert type(inner) is NoSplitOpError
    assert "modeling_qwen3_5.py" in str(inner) and "register_split_op" not in str(inner)
    assert ("Fix: this graph comes from a transformers model (Qwen3_5TextModel): hattn.compile(model) adapts and "
            "compiles it (then model.generate(...)); for your own loop, torch.compile(hattn.adapt(model), "
            "backend='hattn')") in str(inner)


def test_transformers_sdpa_names_hattn_compile():
    hf = random_model(preset_config("tiny"))  # transformers' default attention: SDPA
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as err:
        _compile(hf, "bcg")(torch.tensor([[1, 2, 3, 4]]), use_cache=False)
    inner = err.value.inner_exception
    assert type(inner) is UnregisteredAttentionError
    assert "calls torch scaled_dot_product_attention" in str(inner)
    assert "(Qwen3_5TextModel): hattn.compile(model) adapts and compiles it" in str(inner)
