"""Warm start without Dynamo: a kind the dispatcher learned with a cache_dir is served by the next process from its
snapshot (no Dynamo trace), with Dynamo's results; whatever might make the snapshot wrong sends the call to Dynamo."""
from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from types import SimpleNamespace

from torch import nn

import hattn
from hattn.compiler import snapshot
from hattn.compiler.dispatch import Dispatch
from hattn.compiler.dispatch import _pattern as dispatch_pattern
from hattn.models.presets import PRESETS, PresetUnavailable, load
from hattn.models.toy import toy_model

PATTERN = ["linear", "full"]


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _traces() -> int:
    """Frames Dynamo has tried to compile in this process (a call that its cached graph serves is not one)."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def _process(cache_dir, model=None, **options):
    """What a new process builds: Dynamo reset, the model from its seed, compiled with cache_dir; (dispatcher,
    backend, model)."""
    torch._dynamo.reset()
    model = model if model is not None else toy_model(pattern=PATTERN)
    be = hattn.backend(mode="eager", inner_compiler="eager", progress=False, cache_dir=str(cache_dir), **options)
    return Dispatch(torch.compile(model, backend=be)), be, model


def _cold(cache_dir, sizes=(4, 5), model=None, dynamic=True):
    """The first process: `sizes` through the dispatcher, marked dynamic (as run_step marks them) or not."""
    call, be, _ = _process(cache_dir, model=model)
    for n in sizes:
        ids = _ids(n)
        if dynamic:
            torch._dynamo.mark_dynamic(ids, 0)
        with torch.inference_mode():  # as the later calls (another grad mode is another kind)
            call(ids)
    return be


def _checked(call, model, ids) -> None:
    with torch.inference_mode():
        torch.testing.assert_close(call(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def cold_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cold = _cold(cache)
    assert (cold.stats.graphs_compiled, cold.stats.graphs_from_snapshots) == (1, 0)
    assert len(list((cache / snapshot.SNAPSHOTS).rglob("*.pkl"))) == 1
    return cache


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_a_new_process_serves_every_size_from_the_snapshot_without_dynamo(cold_cache, sizes):
    """Cold: a symbolic token count, one graph. New process: any size, one token included, comes from the
    snapshot's graph, compiled once, never traced; results are the eager model's."""
    call, be, model = _process(cold_cache)
    traces = _traces()
    for i, n in enumerate(sizes):
        _checked(call, model, _ids(n, i))
    assert _traces() == traces and call.direct_calls == len(sizes)
    assert (be.stats.graphs_compiled, be.stats.graphs_from_snapshots, be.stats.dynamo_seconds) == (1, 1, 0.0)
    assert be.stats.snapshot_load_seconds > 0


def test_the_cold_process_times_its_snapshot_and_the_warm_one_says_so_in_the_startup_breakdown(tmp_path):
    from hattn.counters import describe_startup, reset_stats, total_stats

    reset_stats()
    _cold(tmp_path)
    assert total_stats().snapshot_save_seconds > 0
    reset_stats()
    call, _, model = _process(tmp_path)
    _checked(call, model, _ids(7))
    text = describe_startup(total_stats())
    assert "graphs from snapshots (no Dynamo) 1" in text and "snapshot load" in text, text
    assert total_stats().snapshot_load_seconds > 0 and total_stats().dynamo_seconds == 0


SCALE = 2.0  # a module global the forward reads: Dynamo guards its value


class _Mode:
    pass


FAST, SLOW = _Mode(), _Mode()  # told apart by identity only
CURRENT = FAST


class _Hooked(nn.Module):
    """The toy model, scaled by an attribute, a class attribute, a global, a global's and an attribute's identity, a
    deep config flag and a function attribute, then a method's result."""

    boost = 1.0

    def __init__(self, inner, scale: float, fn=None):
        super().__init__()
        self.inner, self.scale, self.fn, self.mode = inner, scale, fn, FAST
        self.cfg = SimpleNamespace(a=SimpleNamespace(b=SimpleNamespace(flag=False)))

    def post(self, h):
        return h

    def forward(self, ids):
        h = self.inner(ids) * self.scale * SCALE * self.boost
        h = h * (2 if CURRENT is FAST else 3) * (5 if self.mode is FAST else 7)
        h = h + 1 if self.cfg.a.b.flag else h
        h = h * 3 if hasattr(self.cfg.a, "absent") else h  # Dynamo guards that an attribute does not exist
        return self.post(self.fn(h) if self.fn is not None else h)


CHANGES = ["attribute", "config", "traced file", "parameter layout", "dtype", "grad mode", "submodule hook",
           "untied", "global", "partial", "closure", "class attribute", "patched method", "global identity",
           "attribute identity", "deep flag", "varargs", "attribute added", "patched torch method", "constant"]


def _changed(change: str, monkeypatch):
    """(the first process's model, the second's, the call's ids) for one kind of change between them; a change of
    the second process's surroundings (a global, a source file) is made after the first process ran."""
    def make(**kw):
        return _Hooked(toy_model(pattern=PATTERN, **kw), 2.0, fn=functools.partial(torch.mul, other=2.0))

    first, model, ids = make(), make(), _ids(6)
    if change == "attribute":
        model.scale = 3.0
    elif change == "config":
        model = make(intermediate=96)
    elif change == "parameter layout":  # same shape and dtype (the model key), other strides
        w = model.inner.layers[0].mlp.down.weight
        w.data = w.data.t().contiguous().t()
    elif change == "dtype":
        ids = ids.int()
    elif change == "submodule hook":
        model.inner.layers[0].mlp.register_forward_hook(lambda mod, args, out: out * 0)
    elif change == "untied":  # the first process's head is the embedding (one graph input), this one's its own
        first.inner.lm_head.weight = first.inner.embed.weight
        model.inner.lm_head.weight = nn.Parameter(model.inner.embed.weight.detach().clone())
    elif change == "partial":
        model.fn = functools.partial(torch.mul, other=7.0)
    elif change == "closure":
        def scaled(factor):
            return lambda h: h * factor
        first.fn, model.fn = scaled(2.0), scaled(7.0)
    elif change == "attribute identity":
        model.mode = SLOW
    elif change == "deep flag":
        model.cfg.a.b.flag = True
    elif change == "attribute added":  # one that was absent when traced
        model.cfg.a.absent = True
    elif change == "constant":  # the same bytecode and file, another constant (functions built from strings)
        first.fn, model.fn = eval("lambda h: h * 2"), eval("lambda h: h * 7")
    elif change == "varargs":  # the same bytecode, another signature
        first.fn, model.fn = (lambda h: h[0] * 2), (lambda *h: h[0] * 2)
        ids = _ids(6)
    return first, model, ids


def _after_cold(change: str, monkeypatch) -> None:
    """A change of the second process's surroundings: a global, a class, a source file."""
    this = sys.modules[__name__]
    if change == "global":  # a flag a user sets at start-up
        monkeypatch.setattr(this, "SCALE", 5.0)
    elif change == "global identity":
        monkeypatch.setattr(this, "CURRENT", SLOW)
    elif change == "class attribute":
        monkeypatch.setattr(_Hooked, "boost", 3.0)
    elif change == "patched method":  # as a patching library replaces a transformers method
        monkeypatch.setattr(_Hooked, "post", lambda self, h: h * 5)
    elif change == "patched torch method":  # torch's version is in the key, but not what a user set on its class
        monkeypatch.setattr(nn.Linear, "forward", lambda self, x: nn.functional.linear(x, self.weight) * 1.5)
    elif change == "traced file":
        real = snapshot.file_digest
        monkeypatch.setattr(snapshot, "file_digest", lambda f: "edited" if f.endswith("toy.py") else real(f))


@pytest.mark.parametrize("change", CHANGES)
def test_what_would_make_a_snapshot_wrong_sends_the_call_to_dynamo(tmp_path, monkeypatch, change):
    """Whatever Dynamo would have traced differently (a module attribute, the config, a source file it traced, a
    parameter's layout, the call's dtype or grad mode, a hook on a submodule, tied weights, a global it guarded, a
    partial's or closure's values, a class attribute, a method patched on the class, which object a global or an
    attribute is, a flag deep in a config object, a function's signature or constants, an attribute added where
    the forward asked hasattr) or that changes the graph's inputs: the
    snapshot is not used; Dynamo traces, and the results are the model's."""
    first, model, ids = _changed(change, monkeypatch)
    _cold(tmp_path, model=first)
    _after_cold(change, monkeypatch)
    call, be, model = _process(tmp_path, model=model)
    traces = _traces()
    with torch.inference_mode(change != "grad mode"):
        torch.testing.assert_close(call(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert _traces() == traces + 1 and be.stats.graphs_from_snapshots == 0


def test_the_unchanged_model_of_those_tests_is_served_from_its_snapshot(tmp_path):
    """The control of the test above: nothing changed, the snapshot serves."""
    first, model, ids = _changed("none", None)
    _cold(tmp_path, model=first)
    call, be, model = _process(tmp_path, model=model)
    _checked(call, model, ids)
    assert be.stats.graphs_from_snapshots == 1


def test_a_global_changed_after_the_first_call_sends_a_new_size_to_dynamo(tmp_path, monkeypatch):
    """Dynamo checks the globals at every new kind: so does a snapshot's graph, not only when it was compiled."""
    first, model, _ = _changed("none", None)
    _cold(tmp_path, model=first)
    call, be, model = _process(tmp_path, model=model)
    _checked(call, model, _ids(6))
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 5.0)
    traces = _traces()
    _checked(call, model, _ids(9))
    assert _traces() == traces + 1 and be.stats.graphs_from_snapshots == 1


DEFAULT = SimpleNamespace(flag=False)


def _add1(h):
    return h + 1


def _mul2(h):
    return h * 2


PIPE = {"a": _add1, "b": _mul2}


class _Holder:
    def __init__(self, v):
        self.v = v


class _Registry:
    table = {"scale": _Holder(2)}


REGISTRY = _Registry()


class _Reads(nn.Module):
    """The toy model, then what a forward may read besides its module: a dict it loops over in order, a class-level
    registry reached through a global instance."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        h = self.inner(ids)
        for fn in PIPE.values():
            h = fn(h)
        return h * REGISTRY.table["scale"].v


class _Defaults(nn.Module):
    """A parameter's default object, which nothing names in another process."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids, cfg=DEFAULT):
        h = self.inner(ids)
        return h * 3 if cfg.flag else h


def test_a_forward_reading_a_default_arguments_object_gets_no_snapshot(tmp_path):
    _cold(tmp_path, model=_Defaults(toy_model(pattern=PATTERN)))
    assert not list((tmp_path / snapshot.SNAPSHOTS).rglob("*.pkl"))


class _Environ(nn.Module):
    """Reads an environment variable: Dynamo guards its value where it is set, nothing where it is not."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        h = self.inner(ids)
        return h * 2 if os.environ.get("HATTN_TEST_SCALE") == "1" else h


@pytest.mark.parametrize("value", [None, "1"])
def test_a_forward_reading_the_environment_gets_no_snapshot(tmp_path, monkeypatch, value):
    """A second process with the variable set (or unset) would be served a graph traced without (or with) it."""
    if value is None:
        monkeypatch.delenv("HATTN_TEST_SCALE", raising=False)
    else:
        monkeypatch.setenv("HATTN_TEST_SCALE", value)
    _cold(tmp_path, model=_Environ(toy_model(pattern=PATTERN)))
    assert not list((tmp_path / snapshot.SNAPSHOTS).rglob("*.pkl"))


def test_an_op_is_described_by_its_name_whatever_its_lazy_attributes():
    """Dynamo guards ops it reads from globals (`torch.ops.hattn.full_attention`); an op packet fills attributes
    at first use (`default`, an overload's `_handle`), so a description by attributes differs between a fresh
    process and the one that traced: no snapshot would ever serve (five of the seven tiny families, before)."""
    packet = torch.ops.aten.sin
    before = [snapshot._plain(snapshot._guarded(kind, v)) for kind in ("BUILTIN_MATCH", "ID_MATCH")
              for v in (packet, packet.default)]
    packet.default._handle  # noqa: B018
    packet(torch.ones(1))
    after = [snapshot._plain(snapshot._guarded(kind, v)) for kind in ("BUILTIN_MATCH", "ID_MATCH")
             for v in (packet, packet.default)]
    assert before == after and "aten.sin.default" in after[1]


@pytest.mark.parametrize("change", ["dict order", "dict key added in place", "registry"])
def test_what_a_forward_reads_outside_its_module_is_checked_at_every_new_kind(tmp_path, monkeypatch, change):
    """A dict's order, a key added to the same dict object, or a registry's entry changed after a snapshot served
    one size: the next new size goes to Dynamo, with the model's results."""
    _cold(tmp_path, model=_Reads(toy_model(pattern=PATTERN)))
    call, be, model = _process(tmp_path, model=_Reads(toy_model(pattern=PATTERN)))
    _checked(call, model, _ids(6))
    assert be.stats.graphs_from_snapshots == 1
    if change == "dict order":
        monkeypatch.setattr(sys.modules[__name__], "PIPE", {"b": _mul2, "a": _add1})
    elif change == "dict key added in place":
        monkeypatch.setitem(PIPE, "c", _mul2)
    else:
        monkeypatch.setattr(_Registry.table["scale"], "v", 5)
    traces = _traces()
    _checked(call, model, _ids(9))
    assert _traces() == traces + 1


def test_torch_flags_changed_after_the_first_call_send_a_new_size_to_dynamo(tmp_path):
    _cold(tmp_path)
    call, be, model = _process(tmp_path)
    _checked(call, model, _ids(6))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium" if before != "medium" else "high")
        traces = _traces()
        _checked(call, model, _ids(9))
        assert _traces() == traces + 1 and be.stats.graphs_from_snapshots == 1
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("torch_form", ["2.13: the object's source, attr=", "2.11: the attribute's source"])
def test_a_hasattr_guard_on_an_absent_attribute_reads_hasattr_in_either_torchs_form(torch_form):
    """transformers asks hasattr(config, "vision_feature_layer") of a text config that lacks it; torch 2.11 names
    the guard by the attribute's source, which cannot be evaluated (the H100 saw AttributeError: no snapshot)."""
    from torch._dynamo.source import AttrSource, LocalSource

    cfg = AttrSource(LocalSource("self"), "cfg")
    if torch_form.startswith("2.13"):
        guard = SimpleNamespace(create_fn=functools.partial(lambda *a, **k: None, attr="absent"))
        source = cfg
    else:
        guard, source = SimpleNamespace(create_fn=lambda *a: None), AttrSource(cfg, "absent")
    module = SimpleNamespace(cfg=SimpleNamespace(present=1))
    expr = snapshot._hasattr_expr(guard, source, LocalSource("self"), "self", {}, {"self": module})
    assert expr == "hasattr(L['self'].cfg, 'absent')"
    assert snapshot._evaluate(expr, {}, "self", module) is False
    module.cfg.absent = 0
    assert snapshot._evaluate(expr, {}, "self", module) is True


def test_a_guard_that_cannot_be_evaluated_at_a_size_is_a_miss():
    import sympy

    s = sympy.Symbol("s0", integer=True, positive=True)
    snap = snapshot.Snapshot(b"", {}, None, [("arg", 0)], True, (), dispatch_pattern((_ids(4),), {0: (0,)}),
                             {0: (0,)}, [(0, 0, s)], [sympy.Eq(sympy.Mod(4, s - 1), 0)], {s: (2, None)})
    assert snap.sizes((_ids(3),)) is not None and snap.sizes((_ids(4),)) is None


class _Lazy:
    """An attribute whose repr fails (a handle not set up yet)."""

    __slots__ = ("value",)

    def __repr__(self):
        return f"Lazy({self.value})"


def test_a_model_the_key_cannot_describe_gets_no_snapshot_and_no_error(tmp_path):
    model = toy_model(pattern=PATTERN)
    model.handle = _Lazy()
    assert snapshot.model_key(model) is None
    call, _, model = _process(tmp_path, model=model)
    _checked(call, model, _ids(6))
    assert not (tmp_path / snapshot.SNAPSHOTS).exists()


def test_a_split_op_registered_after_a_warm_start_compiles_the_snapshot_again(tmp_path):
    """The dispatcher holds the graphs it compiled from snapshots itself (torch._dynamo.reset() does not drop them):
    a registration forgets them, and the next call compiles the snapshot again under the new registry, splitting at
    the op it now names (before, the old graph raised RegisteredAfterCompile at every call)."""
    _cold(tmp_path, model=_Scaled())
    call, be, model = _process(tmp_path, model=_Scaled())
    _checked(call, model, _ids(6))
    assert (be.stats.graphs_from_snapshots, be.stats.split_ops) == (1, 2)
    hattn.register_split_op(torch.ops.hattn_test.snapshot_scale, "snapmix")
    try:
        _checked(call, model, _ids(6))
    finally:
        hattn.unregister_split_op(torch.ops.hattn_test.snapshot_scale)
    assert (be.stats.graphs_from_snapshots, be.stats.split_ops) == (2, 5)


@torch.library.custom_op("hattn_test::snapshot_scale", mutates_args=())
def snapshot_scale(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5


@snapshot_scale.register_fake
def _(x):
    return torch.empty_like(x)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = toy_model(pattern=PATTERN)

    def forward(self, input_ids):
        return torch.ops.hattn_test.snapshot_scale(self.inner(input_ids))


def test_the_compile_options_do_not_change_the_graph_a_snapshot_holds(tmp_path):
    """Dynamo's graph is what the model is, before hattn's passes: a snapshot saved in one mode, with fused linears,
    serves another mode without them (the passes run again on it)."""
    _cold(tmp_path)
    call, be, model = _process(tmp_path, fuse_linears=False)
    _checked(call, model, _ids(6))
    assert be.stats.graphs_from_snapshots == 1 and be.stats.fused_linears == 0


class _Branches(nn.Module):
    """The toy model, then a branch on the token count: Dynamo guards the branch it traced (`n > 4`)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        h = self.inner(ids)
        return h * 2 if ids.shape[0] > 4 else h * 3


def test_the_graphs_shape_guards_decide_which_sizes_a_snapshot_serves(tmp_path):
    """Traced at 6, then 7 tokens (Dynamo's automatic dynamic: a static graph, then a symbolic one guarded `n > 4`):
    the new process serves 5 and 30 from the symbolic graph's snapshot; 4 and 1 fail its guard and match no other
    kind: Dynamo traces them, and they get the other branch's results."""
    _cold(tmp_path, sizes=(6, 7), model=_Branches(toy_model(pattern=PATTERN)), dynamic=False)
    call, be, model = _process(tmp_path, model=_Branches(toy_model(pattern=PATTERN)))
    traces = []
    for n in (5, 30, 4, 1):
        before = _traces()
        _checked(call, model, _ids(n))
        traces.append(_traces() - before)
    assert traces == [0, 0, 1, 1] and be.stats.graphs_from_snapshots == 1


def test_an_unreadable_snapshot_is_logged_and_dynamo_traces(tmp_path, caplog):
    _cold(tmp_path)
    [file] = (tmp_path / snapshot.SNAPSHOTS).rglob("*.pkl")
    file.write_bytes(b"torn")
    call, _, model = _process(tmp_path)
    traces = _traces()
    with caplog.at_level(logging.WARNING, logger="hattn"):
        _checked(call, model, _ids(6))
    assert _traces() == traces + 1 and "could not be read" in caplog.text


def test_snapshots_off_write_and_read_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "enabled", False)
    _cold(tmp_path)
    assert not (tmp_path / snapshot.SNAPSHOTS).exists()


def test_the_model_key_is_the_same_in_another_process(tmp_path):
    """Nothing process-specific (ids, set order, hash salts, the working directory) in the key: a new interpreter
    computes the same one."""
    code = ("import torch, hattn; from hattn.compiler import snapshot; "
            "from hattn.models.presets import load; print(snapshot.model_key(load('tiny')))")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd,
                           env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": os.getcwd()}).stdout.strip()
            for seed, cwd in ((1, os.getcwd()), (2, tmp_path))}  # also from another directory
    assert len(keys) == 1 and len(keys.pop()) == 32


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3-next"])
def test_hattn_generate_warm_starts_without_dynamo_in_a_new_process(tmp_path, preset):
    """The CLI twice with one cache_dir (a tiny transformers preset, graph-free pcg on CPU): the second process
    traces nothing and prints the first's tokens. (Qwen3-Next's MoE reads one of transformers' ops, which Dynamo
    guards: an op must be described alike in a fresh process.)"""
    from hattn.models.presets import preset_config

    try:
        preset_config(preset)
    except PresetUnavailable as e:
        pytest.skip(str(e))
    cmd = [sys.executable, "-m", "hattn.cli", "generate", "--preset", preset, "--device", "cpu", "--mode", "pcg",
           "--inner-compiler", "eager", "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "4", "--timing",
           "--cache-dir", str(tmp_path)]
    runs = [subprocess.run(cmd, capture_output=True, text=True, check=True) for _ in range(2)]
    tokens = [re.search(r"\[0\] .*", r.stdout).group(0) for r in runs]
    assert tokens[0] == tokens[1]
    assert "graphs from snapshots (no Dynamo) 0" in runs[0].stderr
    assert "graphs from snapshots (no Dynamo) 1" in runs[1].stderr and "dynamo 0.00" in runs[1].stderr


def test_a_snapshot_that_cannot_be_saved_leaves_the_call_its_result(tmp_path, caplog):
    """cache_dir/dynamo is a file (or the disk is read-only, or full): a warning, and the call's result stands."""
    (tmp_path / snapshot.SNAPSHOTS).write_text("not a directory")
    call, _, model = _process(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hattn"):
        _checked(call, model, _ids(6))
    assert "could not be saved" in caplog.text


def test_one_token_from_a_snapshot_follows_the_dispatchers_switch(tmp_path, monkeypatch):
    """Size 1 is served from a snapshot only where the dispatcher serves it in-process: not with
    `one_token_via_dynamic` off (Dynamo traces its size-1 graph)."""
    import hattn.compiler.dispatch as dispatch

    _cold(tmp_path)
    monkeypatch.setattr(dispatch, "one_token_via_dynamic", False)
    call, be, model = _process(tmp_path)
    traces = _traces()
    _checked(call, model, _ids(1))
    assert _traces() == traces + 1 and be.stats.graphs_from_snapshots == 0


class _Sliced(nn.Module):
    """An int argument beside the tokens: Dynamo traces it as a symbol of its own."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids, n: int):
        return self.inner(ids)[:n] * 2


def test_an_int_argument_is_part_of_the_kind(tmp_path):
    """The int is in the kind (as Dynamo specializes or guards it): another value is another kind, never served by
    the snapshot of the first with a wrong slice."""
    _cold_model = _Sliced(toy_model(pattern=PATTERN))
    call, _, _ = _process(tmp_path, model=_cold_model)
    with torch.inference_mode():
        for n in (4, 5, 6):
            call(_ids(n), n)
    call, be, model = _process(tmp_path, model=_Sliced(toy_model(pattern=PATTERN)))
    with torch.inference_mode():
        for length, n in ((5, 5), (7, 5), (7, 3)):
            torch.testing.assert_close(call(_ids(length), n), model(_ids(length), n), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("tiny")])
def test_every_family_warm_starts_from_its_snapshot_with_the_same_tokens(tmp_path, preset):
    """Each family's transformers model, adapted: the second "process" generates from the snapshot (no Dynamo
    trace) the first's tokens, for a packed prefill of two prompts and its decode steps."""
    runs = []
    for _ in range(2):
        torch._dynamo.reset()
        try:
            lm = load(preset)
        except PresetUnavailable as e:
            pytest.skip(str(e))
        be = hattn.backend(mode="pcg", inner_compiler="eager", progress=False, cache_dir=str(tmp_path))
        traces = _traces()
        res = hattn.generate(torch.compile(lm, backend=be), [[1, 2, 3, 4, 5], [6, 7]],
                             params=hattn.SamplingParams(max_new_tokens=3))
        runs.append((res.tokens, _traces() - traces, be.stats.graphs_from_snapshots))
    (cold_tokens, cold_traces, _), (warm_tokens, warm_traces, warm_snapshots) = runs
    assert warm_tokens == cold_tokens and (cold_traces, warm_traces, warm_snapshots) == (1, 0, 1)


def test_a_snapshot_declares_the_float_specializations_of_its_trace_to_the_warm_compile(tmp_path, monkeypatch):
    """A frame Dynamo traced again after AOTAutograd's TensorifyScalarRestartAnalysis compiled with the float symbols
    it specialized declared (TensorifyState); its snapshot keeps them and the warm compile declares them again,
    then restores the state (without them the warm compile raised the restart, which no Dynamo catches: seen on the
    H200 in session 28). The names here are planted: the toy model's CPU trace specializes no float."""
    from torch._dynamo.symbolic_convert import TensorifyState

    TensorifyState.specialize("zf7")
    assert snapshot._specialized_floats() == ("zf7",)
    TensorifyState.clear()
    monkeypatch.setattr(snapshot, "_specialized_floats", lambda: ("zf3", "zf5"))
    _cold(tmp_path)
    monkeypatch.undo()
    [file] = (tmp_path / snapshot.SNAPSHOTS).rglob("*.pkl")
    import pickle

    assert pickle.loads(file.read_bytes()).floats == ("zf3", "zf5")
    declared = []
    real = snapshot.specialized_floats

    def spy(names):
        declared.append((names, set(TensorifyState.force_specializations)))
        return real(names)

    monkeypatch.setattr(snapshot, "specialized_floats", spy)
    call, be, model = _process(tmp_path)
    TensorifyState.specialize("zf0")  # another frame's (after _process: torch._dynamo.reset() clears them), kept
    _checked(call, model, _ids(6))
    assert be.stats.graphs_from_snapshots == 1 and [d[0] for d in declared] == [("zf3", "zf5")]
    assert TensorifyState.force_specializations == {"zf0"}
    with real(("zf3",)):
        assert TensorifyState.should_specialize("zf3") and TensorifyState.should_specialize("zf0")
    TensorifyState.clear()
