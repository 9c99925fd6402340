"""Startup work, without inductor: structural signatures (identical pieces compiled once), the warm-start cache's
key and entry (torch's artifact save/load replaced by a fake), lazy capture, the startup breakdown and progress.
Inductor end to end: test_warm_start.py; on a GPU: test_startup_gpu.py."""
from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

import hattn
import hattn.compiler.artifacts as artifacts
import hattn.compiler.backend as backend_module
from hattn.compiler.backend import backend, compile_graph
from hattn.compiler.config import Config
from hattn.compiler.signature import signature
from hattn.counters import Stats, describe_startup
from hattn.models import adapt
from hattn.models.presets import preset_config, random_model
from hattn.models.toy import toy_model
from hattn.runtime import build_runtime
from hattn.runtime.graphs import GraphRuntime
from hattn.runtime.tokens import layout_from_args, pick_size

LINEAR3 = ["linear", "linear", "linear"]  # 4 pieces: first, two identical between linear layers, last


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


# -- structural signatures ----------------------------------------------------------------------------------------
UNARY = {"relu": torch.relu, "neg": torch.neg, "sigmoid": torch.sigmoid, "exp": torch.exp}


def _chain(ops: list[str], names: str = "x", scale: float = 2.0) -> fx.GraphModule:
    """x -> ops... -> * scale, -> (out,), with placeholder and node names derived from `names`."""
    graph = fx.Graph()
    x = graph.placeholder(names)
    for i, op in enumerate(ops):
        x = graph.call_function(UNARY[op], (x,))
        x.name = f"{names}_{op}_{i}"
    graph.output((graph.call_function(torch.mul, (x, scale)),))
    return fx.GraphModule(torch.nn.Module(), graph)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(sorted(UNARY)), max_size=5), st.lists(st.sampled_from(sorted(UNARY)), max_size=5))
def test_signature_ignores_names_and_tells_code_apart(ops_a, ops_b):
    x = torch.randn(3, 4)
    same_code = signature(_chain(ops_a, "layer_0_weight"), [x]) == signature(_chain(ops_b, "layer_7_w"), [x])
    assert same_code == (ops_a == ops_b)


def test_signature_tells_apart_constants_and_input_metadata():
    x = torch.randn(3, 4)
    base = signature(_chain(["relu"]), [x])
    assert signature(_chain(["relu"]), [torch.randn(3, 4)]) == base  # values are not code
    variants = [
        signature(_chain(["relu"], scale=3.0), [x]),               # a constant
        signature(_chain(["relu"]), [torch.randn(3, 5)]),          # a shape
        signature(_chain(["relu"]), [x.double()]),                 # a dtype
        signature(_chain(["relu"]), [torch.randn(4, 3).t()]),      # strides
        signature(_chain(["relu"]), [torch.randn(13)[1:].view(3, 4)]),  # a storage offset
        signature(_chain(["relu"]), [torch.randn(3, 4, requires_grad=True)]),  # requires_grad
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_signature_sees_which_inputs_share_storage():
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    graph.output((graph.call_function(torch.add, (a, b)),))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    x = torch.randn(4)
    assert signature(gm, [x, x]) != signature(gm, [x, torch.randn(4)])


def test_signature_strict_is_none_for_what_structure_cannot_vouch_for():
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(torch.randn(4))
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output((graph.call_function(torch.add, (x, graph.get_attr("w"))),))
    with_attr = fx.GraphModule(holder, graph)
    graph = fx.Graph()
    y = graph.placeholder("y")
    graph.output((graph.call_function(lambda t: t * 2, (y,)),))
    with_lambda = fx.GraphModule(torch.nn.Module(), graph)
    x = torch.randn(4)
    sub = x.as_subclass(_Subclass)
    assert signature(with_attr, [x]) is None and signature(with_lambda, [x]) is None
    assert signature(_chain(["relu"]), [sub]) is None and signature(_chain(["relu"]), [x]) is not None
    for gm, inputs in ((with_attr, [x]), (with_lambda, [x]), (_chain(["relu"]), [sub])):
        assert isinstance(signature(gm, inputs, strict=False), str)


class _Subclass(torch.Tensor):
    pass


def test_a_fused_weight_read_by_get_attr_has_static_sizes_in_the_fake_run():
    """A get_attr (fuse_linears' weight) is faked with static sizes, as Dynamo fakes parameters: a symbolic one
    would be named by how many tensors the fake mode met before, which a warm start's compile does not repeat (its
    piece missed torch's cache on the H100), and would make its GEMM's kernel dynamic in K."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    holder = torch.nn.Module()
    holder.register_buffer("w", torch.randn(192, 64))
    graph = fx.Graph()
    graph.output((graph.get_attr("w"),))
    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=False)
    with fake_mode:
        out, = backend_module._CompilePieces(fx.GraphModule(holder, graph), Stats(), False, fake_mode).run()
    assert [type(n) for n in out.shape] == [int, int] and tuple(out.shape) == (192, 64)


# -- identical pieces compiled once, startup breakdown, progress -----------------------------------------------------
@pytest.fixture
def traced_pieces(monkeypatch):
    """Pieces "compiled" as their traced code (no inductor): the backend's dedup and counters run as with it."""
    compiled = []

    def compile_piece(piece, args):
        compiled.append(piece)
        return piece

    monkeypatch.setattr(backend_module, "_compile_piece", compile_piece)
    return compiled


def test_identical_pieces_share_one_compile_and_progress_counts_them(traced_pieces, capsys, one_thread):
    model = toy_model(pattern=LINEAR3)
    be = backend(mode="eager", progress=True)
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(model, backend=be)(_ids(9)), model(_ids(9)), rtol=1e-5, atol=1e-5)
    s = be.stats
    assert (s.pieces, s.pieces_compiled, len(traced_pieces), len(s.piece_compile_seconds)) == (4, 3, 3, 3)
    assert s.dynamo_seconds > 0 and s.split_seconds > 0 and s.fake_run_seconds > 0 and s.compile_seconds > 0
    err = capsys.readouterr().err
    assert "hattn compile: 100%" in err and "4/4" in err and "compiled=3" in err


def _what_it_returned(out, args) -> list:
    """Each tensor a piece returned: sizes, strides, offset, dtype, device, and the first input or earlier output
    whose storage it shares (what the next piece's signature and compile see)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._pytree import tree_flatten

    flat, spec = tree_flatten(out)
    owners = {}
    for k, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            owners.setdefault(StorageWeakRef(a.untyped_storage()), f"input {k}")
    described = [str(spec)]
    for j, x in enumerate(flat):
        if not isinstance(x, torch.Tensor):
            described.append(repr(x))
            continue
        owner = owners.setdefault(StorageWeakRef(x.untyped_storage()), f"output {j}")
        same = next((k for k, a in enumerate(args) if a is x), None)
        base = x._base if x._base is not None else x  # the tensor it views (a root: `_base` never is a view)
        roots = [(k, a) for k, a in enumerate(args) if isinstance(a, torch.Tensor)]
        base = next((f"output {i}" for i, y in enumerate(flat) if y is base), None) or next(
            (f"input {k}" for k, a in roots if base is a or base is a._base), None)
        described.append(f"{tuple(map(str, x.shape))} {tuple(map(str, x.stride()))} {x.storage_offset()} {x.dtype} "
                         f"{x.device} {owner} {x.requires_grad} view of {base} input={same}")
    return described


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3-next", "tiny-olmo-hybrid", "tiny-minimax", "tiny-nemotron-h",
                                    "tiny-granite-4.0-h"])
def test_a_piece_of_an_earlier_signature_returns_what_running_it_returns(traced_pieces, preset, monkeypatch):
    """The fake run does not run a piece whose signature an earlier piece had: it makes that piece's outputs as the
    earlier one's were made (`_Returned`). Per family (its tiny preset's layers twice, so that pieces repeat), every
    piece so made returns what running it returns: sizes, strides, offsets, dtypes, grad, which input's or
    output's storage each tensor shares, whether it is a view, whether it is an input itself."""
    config = preset_config(preset)
    config.num_hidden_layers *= 2
    config.layer_types = list(config.layer_types) * 2
    lm = adapt(random_model(config))
    made, call_module = [], backend_module._CompilePieces.call_module

    def checked(self, target, args, kwargs):
        piece, before = self.fetch_attr(target), len(made)
        out = call_module(self, target, args, kwargs)
        if len(made) > before:
            assert _what_it_returned(out, args) == _what_it_returned(piece(*args), args), target
        return out

    made_for = backend_module._Returned.made_for
    monkeypatch.setattr(backend_module._Returned, "made_for", lambda r, args: made.append(1) or made_for(r, args))
    monkeypatch.setattr(backend_module._CompilePieces, "call_module", checked)
    compiles = []
    for _ in range(2):  # as made, then every piece run (no record kept): as many compiles
        torch._dynamo.reset()
        traced_pieces.clear()
        hattn.generate(torch.compile(lm, backend=backend(mode="eager", progress=False)), [[1, 2, 3, 4, 5], [6, 7]],
                       params=hattn.SamplingParams(max_new_tokens=2))
        compiles.append(len(traced_pieces))
        monkeypatch.setattr(backend_module._Returned, "of", classmethod(lambda cls, *a: None))
    assert made and compiles[0] == compiles[1]  # the layers' pieces repeat in every family


def test_progress_false_is_quiet(traced_pieces, capsys, one_thread):
    model = toy_model(pattern=["linear"])
    with torch.inference_mode():
        torch.compile(model, backend=backend(mode="eager", progress=False))(_ids(5))
    assert "hattn compile" not in capsys.readouterr().err


def test_compile_graph_outside_dynamo_counts_no_dynamo_time():
    gm = fx.symbolic_trace(lambda x: torch.relu(x) * 2)
    stats = Stats()
    fn = compile_graph(gm, [torch.randn(3)], Config(mode="eager", inner_compiler="eager"), stats)
    x = torch.randn(3)
    torch.testing.assert_close(fn(x), torch.relu(x) * 2)
    assert stats.dynamo_seconds == 0.0 and stats.split_seconds > 0 and stats.pieces == 1


def test_startup_breakdown_in_order_and_described():
    s = Stats(graphs_compiled=2, pieces=9, pieces_compiled=3, pieces_from_cache=1, cache_hits=1, cache_misses=1,
              cuda_graphs=14, capture_sizes_done=2, kernels_compiled_ahead=7, dynamo_seconds=1.0, split_seconds=0.25,
              fake_run_seconds=0.5,
              compile_seconds=6.0, piece_compile_seconds=[1.0, 4.0], capture_seconds=2.0,
              capture_size_seconds={"full decode 1": 0.5, "full packed 2048": 1.5}, first_replay_seconds=0.125)
    s.add(Stats(piece_compile_seconds=[1.0], compile_seconds=1.0, capture_size_seconds={"full decode 1": 0.25}))
    assert s.piece_compile_seconds == [1.0, 4.0, 1.0]
    assert s.capture_size_seconds == {"full decode 1": 0.75, "full packed 2048": 1.5}  # two graphs' runtimes add up
    assert list(s.startup()) == ["probe_seconds", "dynamo_seconds", "snapshot_load_seconds", "cache_load_seconds",
                                 "split_seconds", "fake_run_seconds", "compile_seconds", "cache_save_seconds",
                                 "snapshot_save_seconds", "capture_seconds", "first_replay_seconds"]
    assert describe_startup(s) == (
        "startup s: probe 0.00, dynamo 1.00, snapshot load 0.00, cache load 0.00, split 0.25, fake run 0.50, "
        "compile 7.00, cache save 0.00, snapshot save 0.00, capture 2.00, first replay 0.12\n"
        "graphs 2, pieces 9: 3 compiled (slowest 4.00 s), 1 from torch's cache; cache_dir hits 1, misses 1, "
        "graphs from snapshots (no Dynamo) 0; 2 sizes captured (14 cuda graphs, 7 Triton kernels compiled ahead); "
        "slowest: full packed 2048 1.50 s, full decode 1 0.75 s")


# -- warm start: the cache key and entry ----------------------------------------------------------------------------
class FakeTorchCache:
    """torch.compiler.save/load_cache_artifacts over a list of artifact names: save returns all recorded so far."""

    def __init__(self):
        self.recorded: list[str] = []
        self.loaded: list[bytes] = []

    def save(self):
        if not self.recorded:
            return None
        return ",".join(self.recorded).encode(), SimpleNamespace(artifacts={"inductor": list(self.recorded)})

    def load(self, data: bytes):
        self.loaded.append(data)
        return SimpleNamespace(artifacts={"inductor": data.decode().split(",")})

    def compile_piece(self, piece, args):
        """Records one artifact per compile, and "autotune" at the first run (as inductor autotunes on a GPU)."""
        self.recorded.append(f"piece{len(self.recorded)}")

        def run(*a):
            if "autotune" not in self.recorded:
                self.recorded.append("autotune")
            return piece(*a)

        return run


@pytest.fixture
def fake_cache(monkeypatch):
    cache = FakeTorchCache()
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", cache.save)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", cache.load)
    monkeypatch.setattr(backend_module, "_compile_piece", cache.compile_piece)
    return cache


def _run(cache_dir, seed=0, options=None, **overrides) -> Stats:
    torch._dynamo.reset()  # what a new process starts with
    model = toy_model(seed=seed, pattern=overrides.pop("pattern", LINEAR3), **overrides)
    be = backend(mode="eager", progress=False, cache_dir=str(cache_dir), **(options or {}))
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(model, backend=be)(_ids(9)), model(_ids(9)), rtol=1e-5, atol=1e-5)
    return be.stats


def test_warm_start_same_config_hits_changed_config_misses(fake_cache, tmp_path, one_thread):
    cold = _run(tmp_path)
    assert (cold.cache_hits, cold.cache_misses, cold.pieces_compiled) == (0, 1, 3)
    [entry] = artifacts.entries(tmp_path)
    # saved after the compile, and again after the first run with what it added (autotuning on a GPU)
    assert (entry / "artifacts.bin").read_bytes() == b"piece0,piece1,piece2,autotune"
    key = json.loads((entry / "key.json").read_text())
    assert (key["mode"], key["inner_compiler"], key["torch"]) == ("eager", "inductor", torch.__version__)

    fake_cache.recorded.clear()  # a new process: nothing recorded yet
    warm = _run(tmp_path, seed=1)  # same config, other weights
    assert (warm.cache_hits, warm.cache_misses) == (1, 0)
    assert fake_cache.loaded == [b"piece0,piece1,piece2,autotune"]
    assert (entry / "artifacts.bin").read_bytes() == b"piece0,piece1,piece2,autotune"  # nothing more: not rewritten

    changed = _run(tmp_path, hidden=48)
    assert (changed.cache_hits, changed.cache_misses) == (0, 1)
    assert fake_cache.loaded == [b"piece0,piece1,piece2,autotune"]  # the other key's entry was not read
    assert len(artifacts.entries(tmp_path)) == 2
    for option in ("fuse_linears", "gated_mlp"):  # a graph pass switched: other compiled code, another key
        other = _run(tmp_path, options={option: not getattr(Config(), option)})
        assert (other.cache_hits, other.cache_misses) == (0, 1), option
    assert len(artifacts.entries(tmp_path)) == 4


def test_warm_start_pins_the_gemm_choices_the_first_process_timed(fake_cache, tmp_path, one_thread, monkeypatch):
    from hattn.kernels.gemm import op as gemm_op

    row = dict(m=1, n=8, k=16, dtype="bfloat16", device="cuda:0", bias=False, preload=True, backend="triton",
               cublas_us=5.0, triton_us=4.0, launch=dict(block_n=4, block_k=256, split_k=1, warps=4, stages=4,
                                                          dot=False), plain=False)
    monkeypatch.setattr(gemm_op, "_CHOICES", {})
    gemm_op.load_choices([row])  # what the first process's warm-up timed
    _run(tmp_path)
    [entry] = artifacts.entries(tmp_path)
    assert json.loads((entry / artifacts.GEMM_CHOICES).read_text()) == [row]
    monkeypatch.setattr(gemm_op, "_CHOICES", {})  # a new process
    fake_cache.recorded.clear()
    warm = _run(tmp_path, seed=1)
    assert warm.cache_hits == 1 and gemm_op.choices() == [row]
    (entry / artifacts.GEMM_CHOICES).write_text('[{"backend": "cutlass"}]')  # another version's rows: re-timed
    monkeypatch.setattr(gemm_op, "_CHOICES", {})
    assert _run(tmp_path, seed=2).cache_hits == 1 and gemm_op.choices() == []


def test_cache_dir_keeps_tritons_kernel_cache_unless_the_user_chose_one(fake_cache, tmp_path, monkeypatch, one_thread):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    _run(tmp_path)  # compiling with cache_dir: fla's kernels and autotuning results go beside torch's artifacts
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton") and (tmp_path / "triton").is_dir()
    assert len(artifacts.entries(tmp_path)) == 1  # Triton's directory is not an entry
    mine = str(tmp_path / "mine")
    monkeypatch.setenv("TRITON_CACHE_DIR", mine)
    assert artifacts.keep_kernels_in(str(tmp_path / "other")) == mine and os.environ["TRITON_CACHE_DIR"] == mine
    assert not (tmp_path / "other").exists()


def test_a_read_only_cache_dir_serves_what_it_holds_and_compiles_the_rest_without_saving(
        fake_cache, tmp_path, monkeypatch, one_thread, caplog):
    """A cache_dir shipped read-only: its entry is loaded; a graph it lacks compiles and runs, with a warning that
    its artifacts could not be saved, never an error out of the backend."""
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    _run(tmp_path)
    fake_cache.recorded.clear()

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(artifacts, "_write", read_only)
    monkeypatch.setattr(artifacts.Path, "mkdir", read_only)
    assert _run(tmp_path, seed=1).cache_hits == 1
    with caplog.at_level("WARNING", logger="hattn"):
        changed = _run(tmp_path, hidden=48)  # another graph: a miss, compiled, not saved
    assert (changed.cache_hits, changed.cache_misses) == (0, 1)
    assert "could not be saved" in caplog.text and len(artifacts.entries(tmp_path)) == 1


def test_a_read_only_triton_directory_in_cache_dir_is_used_through_a_writable_copy(tmp_path, monkeypatch, caplog):
    """Triton writes every kernel it compiles into its cache directory (and fails on a read-only one): a shipped
    cache_dir's kernels are copied where Triton can write, not pointed at in place."""
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    shipped = tmp_path / "triton"
    (shipped / "k1").mkdir(parents=True)
    (shipped / "k1" / "kernel.json").write_text("{}")
    writable = artifacts._writable
    monkeypatch.setattr(artifacts, "_writable", lambda path: path != str(shipped) and writable(path))
    with caplog.at_level("WARNING", logger="hattn"):
        chosen = artifacts.keep_kernels_in(str(tmp_path))
    assert chosen != str(shipped) and os.environ["TRITON_CACHE_DIR"] == chosen
    assert (artifacts.Path(chosen) / "k1" / "kernel.json").read_text() == "{}" and "cannot be written" in caplog.text
    assert artifacts._writable(str(tmp_path / "new")) and (tmp_path / "new").is_dir()


def test_tritons_toolchain_is_set_as_inductor_sets_it_before_anything_compiles(fake_cache, tmp_path, monkeypatch,
                                                                              one_thread):
    """ptxas's version and libdevice's hash are in Triton's cache keys: a process whose inductor set them late keyed
    fla's kernels unlike a warm process whose pieces all came from cache (the H100 compiled and autotuned them
    again). Both are set when Triton's cache is chosen and at every graph compile, before anything compiles; a
    setter that fails is skipped."""
    from torch._inductor.runtime import compile_tasks

    calls = []

    def failing():
        calls.append("libdevice")
        raise RuntimeError("no CUDA toolkit")

    monkeypatch.setattr(compile_tasks, "_set_triton_ptxas_path", lambda: calls.append("ptxas"))
    monkeypatch.setattr(compile_tasks, "_set_triton_libdevice_path", failing, raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    artifacts.keep_kernels_in(str(tmp_path / "a"))
    assert calls == ["ptxas", "libdevice"]
    calls.clear()
    torch._dynamo.reset()
    be = backend(mode="eager", progress=False)  # no cache_dir: Triton's default cache has the same keys to keep
    with torch.inference_mode():
        torch.compile(toy_model(pattern=LINEAR3), backend=be)(_ids(9))
    assert calls[:2] == ["ptxas", "libdevice"] and be.stats.graphs_compiled == 1


def test_generate_cache_dir_sets_tritons_cache_before_the_model_loads(tmp_path, monkeypatch, one_thread):
    from hattn import cli
    from hattn.models import presets

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    seen, load = [], presets.load
    monkeypatch.setattr(presets, "load", lambda *a, **k: (seen.append(os.environ.get("TRITON_CACHE_DIR")),
                                                          load(*a, **k))[1])
    assert cli.main(["generate", "--preset", "tiny", "--mode", "none", "--device", "cpu", "--prompt-ids", "1,2",
                     "--max-new-tokens", "1", "--cache-dir", str(tmp_path)]) == 0
    assert seen == [str(tmp_path / "triton")]  # adapt's probe may compile kernels: they land there too


def test_unreadable_entry_is_a_logged_miss_and_torch_caches_off_are_named(tmp_path, caplog):
    from torch._inductor import config as inductor_config

    gm, inputs = _dynamo_graph(toy_model(pattern=["linear"]))
    config = Config(mode="eager", cache_dir=str(tmp_path))
    entry = artifacts.entry_for(config.cache_dir, gm, inputs, config)
    entry.path.mkdir()
    (entry.path / "artifacts.bin").write_bytes(b"not torch's artifacts")
    stats = Stats()
    with caplog.at_level("WARNING", logger="hattn"), inductor_config.patch(fx_graph_cache=False):
        assert artifacts.load_entry(gm, inputs, config, stats).path == entry.path
    assert (stats.cache_hits, stats.cache_misses) == (0, 1)
    assert "could not be read" in caplog.text and "artifacts.bin" in caplog.text
    assert "cannot warm-start: torch's caches are off (torch._inductor.config.fx_graph_cache)" in caplog.text


def _dynamo_graph(model) -> tuple[fx.GraphModule, list]:
    seen = []

    def grab(gm, inputs):
        seen.append((gm, inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(model, backend=grab)(_ids(9))
    return seen[0]


def test_cache_key_changes_with_everything_that_changes_the_code(tmp_path, monkeypatch):
    pattern = ["linear", "full"]
    gm, inputs = _dynamo_graph(toy_model(pattern=pattern))
    config = Config(mode="pcg")

    def key(gm=gm, inputs=inputs, config=config) -> str:
        return artifacts.entry_for(str(tmp_path), gm, inputs, config).path.name

    base = key()
    assert key(*_dynamo_graph(toy_model(seed=3, pattern=pattern))) == base  # another instance, other weights
    variants = {
        "config": key(*_dynamo_graph(toy_model(pattern=pattern, hidden=48))),
        "dtype": key(*_dynamo_graph(toy_model(pattern=pattern, dtype=torch.float64))),
        "mode": key(config=Config(mode="bcg")),
        "capture_sizes": key(config=Config(mode="pcg", capture_sizes=[1, 2, 4])),
        "inner_compiler": key(config=Config(mode="pcg", inner_compiler="eager")),
    }
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    variants["torch"] = key()
    monkeypatch.undo()
    monkeypatch.setattr(artifacts, "hattn_version", lambda: "0.0.1+other")
    variants["hattn"] = key()
    monkeypatch.setattr(artifacts, "device_name", lambda inputs: "cuda NVIDIA H200 sm_90")
    variants["device"] = key()
    assert len({base, *variants.values()}) == 1 + len(variants), variants


def test_hattn_version_covers_its_source():
    version = artifacts.hattn_version()
    assert version.startswith(f"{hattn.__version__}+") and len(version.split("+")[1]) == 16


@pytest.mark.parametrize("options, match", [
    ({"lazy_capture": "yes"}, "lazy_capture must be True or False, got 'yes'"),
])
def test_bad_startup_options_are_value_errors(options, match):
    with pytest.raises(ValueError, match=match):
        Config.from_options("pcg", options)


def test_cache_dir_that_is_a_file_is_a_value_error(tmp_path):
    file = tmp_path / "f"
    file.write_text("")
    with pytest.raises(ValueError, match=r"cache_dir '.*f' is a file; pass a directory"):
        Config(mode="pcg", cache_dir=file)


def test_torch_caches_turned_off_are_named():
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    assert artifacts.torch_caches_off() == []
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        assert artifacts.torch_caches_off() == ["torch._inductor.config.fx_graph_cache",
                                                "torch._functorch.config.enable_autograd_cache"]
    assert artifacts.torch_caches_off() == []


# -- lazy capture -----------------------------------------------------------------------------------------------------
class RecordingGraphs(GraphRuntime):
    """A graph runtime whose capture records the size and whose replay calls fn on the static inputs."""

    def __init__(self, fn, sizes, lazy_capture=True):
        super().__init__(fn, layout_from_args([torch.zeros(1)]), sizes, Stats(), progress=False)
        self.lazy_capture, self.order = lazy_capture, []

    def capture(self, size, args):
        self.order.append(size)

    def replay(self, size, args):
        return self.fn(*args)


def _rowwise(x):
    return x * 3 - 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=6, unique=True), st.lists(st.integers(1, 80), max_size=8))
def test_lazy_capture_captures_the_largest_first_then_each_size_at_first_use(sizes, counts):
    rt = RecordingGraphs(_rowwise, sizes)
    with mock.patch("gc.collect", lambda *a: 0):  # the first capture's full collection: 0.3 s in a test process
        for n in counts:
            x = torch.randn(n, 2)
            torch.testing.assert_close(rt(x), _rowwise(x))
    used = [pick_size(sorted(sizes), n) for n in counts if n <= max(sizes)]
    expected = []
    for size in used:  # per call: the largest if not yet captured, then the call's size
        expected += [s for s in sorted({max(sizes), size}, reverse=True) if s not in expected]
    assert rt.order == expected
    assert rt.stats.capture_sizes_done == len(expected) and rt.stats.replays == len(used)


def test_capture_all_sizes_at_the_first_call_when_not_lazy():
    rt = RecordingGraphs(_rowwise, [2, 4, 8, 16], lazy_capture=False)
    rt(torch.randn(3, 2))
    rt(torch.randn(1, 2))
    assert rt.order == [16, 8, 4, 2] and rt.stats.replays == 2


def test_first_replay_is_timed_once():
    calls = []

    def slow_once(x):
        calls.append(1)
        if len(calls) == 1:
            import time

            time.sleep(0.05)
        return x

    rt = RecordingGraphs(slow_once, [4])
    rt(torch.randn(3, 2))
    rt(torch.randn(3, 2))
    assert 0.05 <= rt.stats.first_replay_seconds < 0.5 and rt.stats.replays == 2


@pytest.mark.parametrize("lazy", [True, False])
def test_build_runtime_passes_lazy_capture_to_graph_runtimes(monkeypatch, lazy):
    import hattn.runtime.piecewise as piecewise
    from hattn.passes.split import split_graph

    gm = fx.symbolic_trace(lambda x: torch.relu(x) * 2)
    split_gm, _ = split_graph(gm)
    x = torch.randn(4, 2)
    monkeypatch.setattr(piecewise, "served_layout", lambda mode, split_gm, inputs, stats: layout_from_args([x]))
    runtime = build_runtime(Config(mode="pcg", lazy_capture=lazy), split_gm, [x], Stats())
    assert isinstance(runtime, piecewise.PiecewiseRuntime) and runtime.lazy_capture is lazy


# -- hattn generate --timing / --cache-dir ---------------------------------------------------------------------------
def test_generate_timing_prints_the_startup_breakdown(capsys, one_thread):
    from hattn import cli

    hattn.reset_stats()  # uncompiled (--mode none): the breakdown of nothing compiled, fast
    rc = cli.main(["generate", "--preset", "tiny", "--mode", "none", "--device", "cpu", "--prompt-ids", "1,2,3",
                   "--max-new-tokens", "2", "--timing"])
    err = capsys.readouterr().err
    assert rc == 0
    first = next(line for line in err.splitlines() if line.startswith("process start to first token"))
    total, imports, model, setup = map(float, re.findall(
        r"first token ([\d.]+) s: .*\(imports ([\d.]+), model built and adapted ([\d.]+), cache and compile "
        r"set-up ([\d.]+)\)", first)[0])
    assert 0 < imports and 0 < model and 0 <= setup and imports + model + setup <= total + 0.015, first  # 2 decimals
    assert re.search(r"startup s: probe [\d.]+, dynamo 0.00, snapshot load 0.00, cache load 0.00", err)
    assert "graphs 0, pieces 0: 0 compiled" in err


def test_generate_timing_refuses_warmup(capsys):
    from hattn import cli

    assert cli.main(["generate", "--preset", "tiny", "--prompt-ids", "1,2", "--timing", "--warmup", "1"]) == 2
    assert "hattn generate: error: --timing measures the first generate" in capsys.readouterr().err
