"""HybridCache: shapes per layer kind, one slot per sequence, alloc/free/reuse, clear errors."""
import pytest
import torch

from hattn.context import LayerSpec
from hattn.models.cache import HybridCache
from hattn.ops import full, lightning, linear

SPECS = {0: linear.cache_spec(conv_dim=48, kernel=4, v_heads=4, k_dim=8, v_dim=16), 1: full.cache_spec(2, 16, 8),
         3: lightning.cache_spec(4, 8)}


def cache(slots=3, max_len=10, dtype=torch.bfloat16):
    return HybridCache(SPECS, slots=slots, max_len=max_len, dtype=dtype)


def test_shapes_and_dtypes_per_kind():
    c = cache()
    rows = c.slots + 1  # + the scratch slot graph runtimes point padding at
    k, v = c.state(1)
    assert k.shape == (rows, 10, 2, 16) and v.shape == (rows, 10, 2, 8) and k.dtype == torch.bfloat16
    conv, rec = c.state(0)
    assert conv.shape == (rows, 48, 3) and conv.dtype == torch.bfloat16
    assert rec.shape == (rows, 4, 8, 16) and rec.dtype == torch.float32  # recurrent states stay fp32
    (s,) = c.state(3)
    assert s.shape == (rows, 4, 8, 8) and s.dtype == torch.float32
    assert c.nbytes() == sum(t.numel() * t.element_size() for i in SPECS for t in c.state(i))
    assert "slots=3" in repr(c)


def test_a_layer_the_cache_does_not_hold_is_an_error():
    with pytest.raises(KeyError, match=r"no layer 2; cached layers: \[0, 1, 3\]"):
        cache().state(2)


def test_alloc_free_reuse():
    c = cache(slots=3)
    a = c.alloc(2)
    assert a == [0, 1] and c.num_free == 1
    with pytest.raises(RuntimeError, match="1 free slot.*2 were requested"):
        c.alloc(2)
    c.free([0])
    assert c.alloc(2) == [0, 2] and c.num_free == 0
    for outside in (5, c.scratch_slot, -1):  # the scratch slot (padding rows' row) is never a sequence's
        with pytest.raises(ValueError, match="not an allocated slot"):
            c.free([outside])
    c.free([0, 1, 2])
    with pytest.raises(ValueError, match="not an allocated slot"):
        c.free([1])
    assert c.scratch_slot == 3 and c.alloc(3) == [0, 1, 2]  # the scratch slot is never handed out
    # a slot freed twice in one call was handed to two sequences by the next alloc; alloc(-1) took all but one
    with pytest.raises(ValueError, match="or is given twice"):
        c.free([1, 1])
    assert c.num_free == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="alloc takes a number of slots >= 0"):
            c.alloc(bad)
    assert c.alloc(0) == [] and c.num_free == 0


def test_addresses_are_fixed():
    c = cache()
    before = [t.data_ptr() for i in SPECS for t in c.state(i)]
    c.free(c.alloc(3))
    assert before == [t.data_ptr() for i in SPECS for t in c.state(i)]


def test_bad_specs_and_sizes():
    with pytest.raises(ValueError, match="exactly one of kv"):
        LayerSpec("full")
    with pytest.raises(ValueError, match="slots >= 1"):
        HybridCache(SPECS, slots=0, max_len=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="max_len >= 1"):
        HybridCache(SPECS, slots=2, max_len=0, dtype=torch.float32)


@pytest.mark.parametrize("slots, max_len", [(2.5, 4), (2, 4.0), (True, 4), (2, "4")])
def test_sizes_must_be_ints(slots, max_len):
    with pytest.raises(TypeError, match="must be an int"):
        HybridCache(SPECS, slots=slots, max_len=max_len, dtype=torch.float32)


def test_numpy_ints_are_sizes():
    np = pytest.importorskip("numpy")
    c = HybridCache(SPECS, slots=np.int64(2), max_len=np.int32(4), dtype=torch.float32)
    assert (c.slots, c.max_len) == (2, 4) and type(c.slots) is int


def test_the_planned_size_is_what_is_allocated():
    c = cache(slots=5, max_len=7)  # bf16 KV cache, fp32 recurrent states: both dtypes counted
    assert c._planned_bytes() == c.nbytes()


def test_a_cache_larger_than_the_device_is_refused_before_allocating():
    # 2**40 tokens of one full layer's KV: far more than any machine's memory; torch's allocator would fail with a
    # bare byte count (or take the swap) where this names the sizes and the fix
    with pytest.raises(ValueError, match=r"slots=2, max_len=1099511627776 .* GiB, more than .*lower max_len"):
        HybridCache({1: full.cache_spec(2, 16, 8)}, slots=2, max_len=2**40, dtype=torch.bfloat16)


def test_on_cuda_the_room_counts_what_torchs_allocator_holds_unused(monkeypatch):
    """A review found the check refusing caches torch could allocate: the driver's free bytes leave out the blocks
    torch's caching allocator holds (an old cache just freed), which it releases before failing."""
    from types import SimpleNamespace

    from hattn.models import cache as cache_module

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 * gib)
    cache = SimpleNamespace(device=torch.device("cuda"), slots=8, max_len=4096, dtype=torch.bfloat16)
    cache_module._check_fits(6 * gib, cache)  # 1 GiB free + 6 GiB held unused
    with pytest.raises(ValueError, match=r"needs 8.0 GiB, more than the 7.0 GiB cuda has free"):
        cache_module._check_fits(8 * gib, cache)
