import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from torch import nn

import hattn
from hattn.models.presets import PresetUnavailable

# CI draws the same examples every run (derandomize): a red CI then means a change broke something, never a new
# random draw; exploring new draws is what the dev profile and the GPU runs do
settings.register_profile(
    "ci", max_examples=500, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield


@pytest.fixture(autouse=True)
def _triton_cache_dir():
    """A backend with cache_dir sets TRITON_CACHE_DIR for the process (artifacts.keep_kernels_in): each test gets
    the environment's value back, so one test's temporary directory never becomes another's kernel cache."""
    before = os.environ.get("TRITON_CACHE_DIR")
    yield
    if before is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = before


# Split ops defined for tests: a functional one, an out= one and one returning a tuple, all of the user kind
# "testmix".


@torch.library.custom_op("hattn_test::scale", mutates_args=())
def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor + 1


@scale.register_fake
def _(x, factor):
    return torch.empty_like(x)


@torch.library.custom_op("hattn_test::add_into", mutates_args=("out",))
def add_into(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x + x.sum(dim=-1, keepdim=True))


@add_into.register_fake
def _(x, out):
    return None


@torch.library.custom_op("hattn_test::pair", mutates_args=())
def pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * 2, x - 1


@pair.register_fake
def _(x):
    return torch.empty_like(x), torch.empty_like(x)


hattn.register_split_op(torch.ops.hattn_test.scale, "testmix")
hattn.register_split_op(torch.ops.hattn_test.add_into, "testmix")
hattn.register_split_op(torch.ops.hattn_test.pair, "testmix")  # a split op returning a tuple


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster, and immune to OpenMP spinning on a busy 2-core CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SdpaAttention(nn.Module):
    """A toy full-attention mixer that calls SDPA directly instead of a hattn split op (what the guards reject)."""

    def __init__(self, c, layer_id: int):
        super().__init__()
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(0).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)[0]


@pytest.fixture
def sdpa_mixer():
    """The toy mixer class that calls SDPA unregistered (ToyHybridModel(..., mixers={"sdpa": sdpa_mixer}))."""
    return SdpaAttention


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_unavailable_presets())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_unavailable_presets())


def _skip_unavailable_presets():
    """A preset whose model family the installed transformers lacks is a skip that says so, not a failure."""
    try:
        return (yield)
    except PresetUnavailable as e:
        pytest.skip(str(e))
