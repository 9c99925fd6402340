"""Each row's floor: the bytes a decode step must move (weights without the input embedding, KV reads, state read
+ write), the FLOPs of a prefill, and the bound that sets the floor."""
import pytest
import torch

from hattn.bench.floor import decode_weight_bytes, floor_ms, prefill_flops, state_bytes, with_floor
from hattn.bench.kernels import attn_decode_points
from hattn.bench.workloads import Plan, Point
from hattn.context import LayerSpec


@pytest.fixture(scope="module")
def tiny_lm():
    from hattn.models.hf import adapt
    from hattn.models.presets import preset_config, random_model

    return adapt(random_model(preset_config("tiny"), torch.float32, "cpu"))


def test_decode_weights_leave_out_the_input_embedding_and_count_a_tied_head_once(tiny_lm):
    hf = tiny_lm.hf
    every = sum(p.numel() * 4 for p in hf.parameters())
    emb = hf.get_input_embeddings().weight
    assert hf.get_output_embeddings().weight is not emb
    assert decode_weight_bytes(hf) == every - emb.numel() * 4
    hf.lm_head.weight = emb  # tie: the one matrix is the LM head too, read once
    try:
        assert decode_weight_bytes(hf) == every - emb.numel() * 4
        assert sum(p.numel() * 4 for p in hf.parameters()) == every - emb.numel() * 4
    finally:
        hf.lm_head.weight = torch.nn.Parameter(emb.detach().clone())
    wider = torch.nn.Embedding(emb.shape[0] + 7, emb.shape[1])  # not the head's size: which one is left out shows
    hf.set_input_embeddings(wider)
    try:
        assert decode_weight_bytes(hf) == every - emb.numel() * 4
    finally:
        hf.set_input_embeddings(torch.nn.Embedding.from_pretrained(emb.detach(), freeze=False))


def test_state_bytes_kv_reads_and_state_read_write():
    specs = {0: LayerSpec("full", kv=(2, 16, 8)),
             1: LayerSpec("linear", states=(((12, 3), None), ((4, 16, 16), torch.float32)))}
    kv = 3 * (100 + 1) * 2 * (16 + 8) * 2
    states = 2 * 3 * (12 * 3 * 2 + 4 * 16 * 16 * 4)
    assert state_bytes(specs, batch=3, context=100, elem=2) == kv + states


def test_with_floor_fills_decode_per_token_and_prefill_rows(tiny_lm):
    plan = Plan(tokens=[16], seqs=2, batches=[4], context=64, prompt=16, new_tokens=8, gen_batches=[1])
    specs, weights = tiny_lm.cache_specs(), decode_weight_bytes(tiny_lm.hf)
    rows = with_floor(plan.points() + plan.derived(), tiny_lm)
    points = {p.kind: p for p in rows}
    decode = {(p.batch, p.context): p for p in rows if p.kind == "decode"}
    assert decode[4, 64].bytes == weights + state_bytes(specs, 4, 64, 4)
    assert decode[1, 20].bytes == points["per_token"].bytes  # the generate steps' context: the same step
    assert points["per_token"].bytes == weights + state_bytes(specs, 1, 16 + 4, 4)
    assert points["prefill"].bytes == weights and points["e2e"].bytes == 0
    assert points["prefill"].flops == prefill_flops(tiny_lm.hf, specs, 16, 2, 4)


def test_prefill_flops_body_head_on_last_tokens_and_causal_attention(tiny_lm):
    hf, specs = tiny_lm.hf, tiny_lm.cache_specs()
    head = hf.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in hf.parameters()) - head - hf.get_input_embeddings().weight.numel()
    full = [s for s in specs.values() if s.kv]
    assert len(full) == 1 and full[0].kv == (2, 16, 16)
    attention = 2 * 4 * (16 + 16) * 8 * 9 // 2  # Hq=4, one sequence of n=8 tokens
    assert prefill_flops(hf, specs, 16, 2, q_heads=4) == 2 * body * 16 + 2 * head * 2 + 2 * attention


def test_floor_is_the_larger_bound():
    row = {"bytes": 2_000_000, "flops": 10**9}  # 2 us of copy; 1 us at 1 PFLOP/s, 10 us at 100 TFLOP/s
    assert floor_ms(row, bandwidth=1e12, matmul_flops=1e15) == (pytest.approx(2e-3), "memory")
    assert floor_ms(row, bandwidth=1e12, matmul_flops=1e14) == (pytest.approx(1e-2), "compute")
    assert floor_ms(row, bandwidth=1e12, matmul_flops=None) == (pytest.approx(2e-3), "memory")
    assert floor_ms({"bytes": 0, "flops": 0}, 1e12, 1e15) == (None, None)


def test_attention_decode_bytes_match_the_kernels_own_count():
    pytest.importorskip("triton")
    from hattn.kernels.attention.decode_triton import decode_attention_bytes

    for p in attn_decode_points(False, torch.device("cpu")):
        q = torch.empty(p.batch, 8, 256, dtype=torch.bfloat16)
        cache = torch.empty(1, p.context + 1, 2, 256, dtype=torch.bfloat16)
        assert p.bytes == decode_attention_bytes(q, cache, cache, [p.context] * p.batch, q), p.id
    assert [p.calls for p in attn_decode_points(False, torch.device("cpu"))] == [1] * 8
    assert Point("attn-decode", batch=1, context=1024).series == "attn-decode/C1024"


@pytest.mark.parametrize("preset", ["tiny-qwen3-next", "tiny-minimax", "tiny-bailing-hybrid", "tiny-kimi-linear",
                                    "tiny-nemotron-h", "tiny-granite-4.0-h"])
def test_routed_experts_count_their_top_k_share_so_the_floor_stays_a_floor(preset):
    """A token reads top-k of a layer's routed experts (shared experts whole): the decode bytes and prefill FLOPs
    count the stacked expert parameters at k / experts (4 experts, top-2 in the tiny presets), never more."""
    from hattn.bench.floor import routed_share
    from hattn.models.presets import preset_config, random_model

    hf = random_model(preset_config(preset), torch.float32, "cpu", seed=0)
    config = hf.config.get_text_config()
    stacked = [p for name, m in hf.named_modules() if name.endswith(".experts") for p in m.parameters()]
    assert stacked and set(routed_share(hf).values()) == {config.num_experts_per_tok / 4}
    assert set(map(id, stacked)) == set(routed_share(hf))
    emb, head = hf.get_input_embeddings().weight, hf.get_output_embeddings().weight
    every = sum(p.numel() * p.element_size() for p in hf.parameters() if p is not emb or head is emb)
    expert_bytes = sum(p.numel() * p.element_size() for p in stacked)
    assert decode_weight_bytes(hf) == every - expert_bytes // 2
    assert routed_share(random_model(preset_config("tiny"), torch.float32, "cpu", seed=0)) == {}  # dense
