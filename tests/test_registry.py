"""The registry: what is a split op, registration errors, routing by layer id and kind."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import hattn
import hattn.ops  # noqa: F401
from hattn import registry
from hattn.registry import RegistryError, check_route, split_op_of


def test_builtin_ops_are_split_ops_by_packet_and_overload():
    kinds = {"full_attention": "full", "linear_attention": "linear", "kda_attention": "kda",
             "lightning_attention": "lightning", "mamba2_mixer": "mamba2", "short_conv": "short_conv"}
    for name, kind in kinds.items():
        packet = getattr(torch.ops.hattn, name)
        assert split_op_of(packet).kind == kind
        assert split_op_of(packet.default).kind == kind
    assert split_op_of(torch.ops.aten.mm) is None and split_op_of(torch.sin) is None


def test_every_mode_is_registered_by_its_runtime_module():
    assert list(registry.modes()) == ["eager", "pcg", "bcg", "full"]
    assert [m.graphs for m in registry.modes().values()] == [False, True, True, True]
    with pytest.raises(ValueError, match="unknown hattn mode 'fast'; valid modes: eager, pcg, bcg, full"):
        registry.mode("fast")


def test_split_op_of_fx_nodes():
    g = fx.Graph()
    x = g.placeholder("x")
    node = g.call_function(torch.ops.hattn_test.scale.default, (x, 1.0))
    assert split_op_of(node).kind == "testmix"
    assert split_op_of(x) is None


def test_register_twice_same_kind_ok_other_kind_error():
    hattn.register_split_op(torch.ops.hattn_test.scale, "testmix")
    with pytest.raises(RegistryError, match="already a split op of kind 'testmix'; it cannot also be 'full'"):
        hattn.register_split_op("hattn_test::scale", "full")


def test_an_op_is_named_by_its_packet_or_any_overload_as_a_string_too():
    """"ns::op" and "ns::op.default" name one split op, as torch.ops.ns.op and its .default do."""
    assert hattn.register_split_op("hattn_test::scale.default", "testmix") is split_op_of(torch.ops.hattn_test.scale)
    assert hattn.register_split_op(torch.ops.hattn_test.scale.default, "testmix").name == "hattn_test::scale"
    assert split_op_of(torch.ops.hattn_test.scale.default).name == "hattn_test::scale"


def test_an_empty_layer_table_knows_no_layer():
    """An empty table is a model's table that lists no layer (not the bare toy model's None): a call is an error."""
    with pytest.raises(RegistryError, match="has no layer 0"):
        check_route("full", 0, {})


def test_register_rejects_non_custom_ops_and_bad_kinds():
    with pytest.raises(RegistryError, match="is not a torch custom op"):
        hattn.register_split_op(lambda x: x, "mamba")
    with pytest.raises(RegistryError, match="must be an identifier"):
        hattn.register_split_op(torch.ops.hattn_test.scale, "not a kind")


def test_register_names_a_missing_op_and_wants_a_bool_capture_safe():
    with pytest.raises(RegistryError, match="no custom op 'hattn_test::typo' is defined"):
        hattn.register_split_op("hattn_test::typo", "testmix")
    with pytest.raises(RegistryError, match="capture_safe must be True or False, got 'no'"):
        hattn.register_split_op(torch.ops.hattn_test.scale, "testmix", capture_safe="no")
    with pytest.raises(RegistryError, match="strided_inputs must be True or False, got 1"):
        hattn.register_split_op(torch.ops.hattn_test.scale, "testmix", strided_inputs=1)


_DECOMPOSED = torch.library.Library("hattn_test_decomposed", "DEF")
_DECOMPOSED.define("mix(Tensor x) -> Tensor")
_DECOMPOSED.impl("mix", lambda x: x * 3, "CompositeImplicitAutograd")
_DECOMPOSED.define("mix_explicit(Tensor x) -> Tensor")
_DECOMPOSED.impl("mix_explicit", lambda x: x * 3, "CompositeExplicitAutograd")


class _TimesThree(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, grad):
        return grad * 3


_DECOMPOSED.define("mix_autograd(Tensor x) -> Tensor")
_DECOMPOSED.impl("mix_autograd", lambda x: x * 3, "CPU")
_DECOMPOSED.impl("mix_autograd", _TimesThree.apply, "Autograd")  # computes itself: its inner ops run above Python


def test_bcg_sees_a_split_op_whose_autograd_kernel_computes_itself():
    """Under no_grad such an op reached bcg's watch as its inner ops (x * 3), so it was captured inside a graph
    (found by a review); the watch runs below autograd."""
    from hattn.runtime.breakable import _Capture, watched

    hattn.register_split_op(torch.ops.hattn_test_decomposed.mix_autograd, "decomposed")
    try:
        cap = _Capture()
        with torch.no_grad():
            out = watched(cap, torch.ops.hattn_test_decomposed.mix_autograd, (torch.ones(2),))
        assert cap.split_calls == 1 and out.tolist() == [3.0, 3.0]
    finally:
        hattn.unregister_split_op(torch.ops.hattn_test_decomposed.mix_autograd)


@pytest.mark.parametrize("op", ["mix", "mix_explicit"])
def test_bcg_sees_a_split_op_whose_kernel_is_composite(op):
    """A CompositeImplicitAutograd kernel decomposes at the autograd key, above bcg's dispatch mode: under no_grad
    the watch met its inner ops (x * 3), so the op was captured inside a graph (found by a review). The watch runs
    below autograd, where it meets the op itself."""
    from hattn.runtime.breakable import _Capture, watched

    packet = getattr(torch.ops.hattn_test_decomposed, op)
    hattn.register_split_op(packet, "decomposed")
    try:
        cap = _Capture()
        with torch.no_grad():
            out = watched(cap, packet, (torch.ones(2),))
        assert cap.split_calls == 1 and out.tolist() == [3.0, 3.0]
    finally:
        hattn.unregister_split_op(packet)


def test_custom_ops_read_their_inputs_layout_unless_registered_strided():
    """Only split ops registered with strided_inputs=True take a view where eager passes a contiguous tensor (what
    fuse_linears' column slices need); torch's own ops follow the strides they are given."""
    strided = {name: not registry.reads_input_layout(getattr(torch.ops.hattn, name).default)
               for name in ("full_attention", "linear_attention", "mamba2_mixer", "kda_attention",
                            "lightning_attention")}
    assert strided == {"full_attention": True, "linear_attention": True, "mamba2_mixer": True,
                       "kda_attention": False, "lightning_attention": False}
    assert registry.reads_input_layout(torch.ops.hattn_test.scale)  # registered without the flag
    assert registry.reads_input_layout(torch.ops.hattn_overload_test.mix)  # not a split op
    assert not registry.reads_input_layout(torch.ops.aten.mm.default)
    assert not registry.reads_input_layout(torch.sin) and not registry.reads_input_layout("sin")


_OVERLOADS = torch.library.Library("hattn_overload_test", "DEF")
_OVERLOADS.define("mix(Tensor x, float s=1.0) -> Tensor")
_OVERLOADS.define("mix.neg(Tensor x, float s) -> Tensor")
_OVERLOADS.impl("mix", lambda x, s=1.0: x * s, "CompositeExplicitAutograd")
_OVERLOADS.impl("mix.neg", lambda x, s: -x * s, "CompositeExplicitAutograd")
_OVERLOADS.impl("mix", lambda x, s=1.0: torch.empty_like(x), "Meta")  # what fake tensors run
_OVERLOADS.impl("mix.neg", lambda x, s: torch.empty_like(x), "Meta")


class _CallsOverloads(torch.nn.Module):
    def forward(self, x):
        return torch.ops.hattn_overload_test.mix.neg(x, 2.0) + torch.ops.hattn_overload_test.mix(x, 3.0)


@pytest.mark.parametrize("mode", ["eager", "pcg", "bcg"])
def test_direct_and_prepare_serve_the_default_overload_only(mode):
    """`direct=` is the default overload's code: a call of another overload (`.neg` here, `.out` in general) goes
    through the dispatcher. It ran the default's code before (2x instead of -2x, silently)."""
    packet = torch.ops.hattn_overload_test.mix
    prepare = lambda *args, **kwargs: None  # noqa: E731
    hattn.register_split_op(packet, "overloadmix", direct=lambda x, s=1.0: x * s, prepare=prepare)
    try:
        assert registry.direct_call(packet.neg) is packet.neg
        assert registry.direct_call(packet.default) is not packet.default
        assert registry.prepare_of(packet.neg) is None and registry.prepare_of(packet) is prepare
        model, x = _CallsOverloads(), torch.ones(3, 4)
        torch._dynamo.reset()
        be = hattn.backend(mode=mode, inner_compiler="eager", progress=False)
        with torch.no_grad(), hattn.forward_context(hattn.ForwardContext(seq_lens=[3])):
            torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x))  # 1.0 each, not 5.0
        assert be.stats.split_ops == 2
    finally:
        hattn.unregister_split_op(packet)


def test_route_cross_checks_layer_kinds():
    kinds = {0: "linear", 1: "full"}
    check_route("full", 1, kinds)
    check_route("full", 5, None)  # no model table: toy models accept any layer
    with pytest.raises(RegistryError, match="layer 0 is a 'linear' layer in the model config but called a 'full'"):
        check_route("full", 0, kinds)
    with pytest.raises(RegistryError, match="has no layer 7"):
        check_route("linear", 7, kinds)


def test_op_call_with_mismatched_layer_table_is_an_error():
    from hattn.models.toy import toy_model

    model = toy_model(pattern=["linear", "full"])
    ids = torch.arange(5)
    with hattn.forward_context(hattn.ForwardContext(seq_lens=[5], layer_kinds={0: "full", 1: "full"})):
        with pytest.raises(RegistryError, match="layer 0 is a 'full' layer"):
            model(ids)


def test_direct_call_skips_the_dispatcher_only_for_ops_with_a_direct_implementation():
    op = torch.ops.hattn.full_attention
    assert registry.direct_call(op.default) is not op.default
    assert registry.direct_call(op).__name__ == "direct_hattn_full_attention"
    assert registry.direct_call(torch.ops.hattn_test.scale) is torch.ops.hattn_test.scale  # no direct=: dispatcher
    assert registry.direct_call(torch.ops.aten.add.Tensor) is torch.ops.aten.add.Tensor  # not a split op
    for bad in ("direct", "prepare"):
        with pytest.raises(RegistryError, match=f"{bad}= must be a function"):
            registry.register_split_op(torch.ops.hattn_test.scale, "testmix", **{bad: 42})


def test_direct_call_keeps_a_profiler_range_named_after_the_op():
    calls = []
    entry = registry.split_op_of(torch.ops.hattn_test.scale)
    registry.register_split_op(torch.ops.hattn_test.scale, "testmix", direct=lambda x, f: calls.append(f) or x * f + 1)
    try:
        fn = registry.direct_call(torch.ops.hattn_test.scale.default)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = fn(torch.ones(2), 3.0)
        assert out.tolist() == [4.0, 4.0] and calls == [3.0]
        assert "hattn_test::scale" in {e.name for e in prof.events()}
    finally:
        registry.register_split_op(torch.ops.hattn_test.scale, "testmix", direct=entry.direct)


@torch.library.custom_op("hattn_test::FusedFlashAttnFwd", mutates_args=())
def _camel_case_mixer(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def test_an_unregistered_mixer_is_recognised_in_any_case_of_its_name():
    """A custom attention kernel named in CamelCase is a mixer too: missed, it would be captured inside a graph with
    the batch layout of capture time (the bug class hattn exists to make impossible)."""
    want = "custom op hattn_test::FusedFlashAttnFwd"
    assert registry.unregistered_mixer(torch.ops.hattn_test.FusedFlashAttnFwd.default) == want
    assert registry.unregistered_mixer(torch.ops.hattn_test.FusedFlashAttnFwd) == want
