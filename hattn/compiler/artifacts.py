"""Warm start: torch's compiled artifacts kept in `cache_dir/<key>` across processes and machines of one kind.

After a graph is compiled and after its first run, what torch's caches recorded in this process (inductor's FX
graph cache, the AOTAutograd cache, inductor's autotuning results: `torch.compiler.save_cache_artifacts`) is written
to `cache_dir/<key>/artifacts.bin`; the next process loads that entry (`load_cache_artifacts`) before compiling the
same graph, so its pieces come out of torch's caches instead of being compiled again. Triton's own cache (the
kernels outside inductor, fla's autotuning results) is kept in `cache_dir/triton` (`keep_kernels_in`), and the
small-M GEMM's per-shape choices (`hattn_kernels::linear`'s cuBLAS-or-Triton timings, made in the warm-up before
each capture) in `cache_dir/<key>/gemm_choices.json`, pinned again by the next process (`load_choices`): a warm
start times no GEMM shape the first process timed.

The key covers what changes the compiled code: the Dynamo graph's structure and its inputs' shapes, strides and
dtypes (so the model config and the dtype: every config field the code depends on is in the graph's shapes or
constants), the mode, inner compiler and capture sizes, hattn's version and source, torch's and triton's versions,
and the device (CUDA capability). An entry of another key is never read; `key.json` beside it says what the key
covered. torch checks its own cache keys again when the pieces compile, so an artifact that does not fit is unused.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx

from hattn.compiler.signature import signature
from hattn.counters import Stats

log = logging.getLogger("hattn")
ARTIFACTS = "artifacts.bin"
KEY_FILE = "key.json"
GEMM_CHOICES = "gemm_choices.json"


@dataclass
class ArtifactEntry:
    """One graph's entry in a cache directory: `path` = cache_dir/<key>; `fields` = what the key hashes."""

    path: Path
    fields: dict
    artifacts: int = 0  # artifacts in the entry as loaded or last saved (a save with no more is skipped)

    def load(self, stats: Stats) -> bool:
        """Hot-load the entry into torch's caches; counts a hit or a miss. An unreadable entry is a miss (logged)."""
        start = time.perf_counter()
        file = self.path / ARTIFACTS
        info = torch.compiler.load_cache_artifacts(file.read_bytes()) if file.is_file() else None
        if info is None and file.is_file():
            log.warning("hattn: the compiled artifacts in %s could not be read (torch logged why); compiling", file)
        if info is None:
            stats.cache_misses += 1
        else:
            stats.cache_hits += 1
            self.artifacts = _count(info)
            self._load_gemm_choices()
        stats.cache_load_seconds += time.perf_counter() - start
        return info is not None

    def save(self, stats: Stats) -> bool:
        """Write what torch's caches recorded in this process so far, unless the entry already holds as much."""
        start = time.perf_counter()
        saved = torch.compiler.save_cache_artifacts()
        more = saved is not None and _count(saved[1]) > self.artifacts
        try:
            if more:
                self._write(*saved)
            if (self.path / KEY_FILE).is_file():
                self._save_gemm_choices()
        except OSError as e:  # a read-only (shipped) or full cache_dir: this process's results stand
            log.warning("hattn: the compiled artifacts could not be saved to %s (%s); a later process compiles "
                        "what this one did again", self.path, e)
            self.artifacts = _count(saved[1]) if more else self.artifacts  # warned once for these artifacts
            more = False
        stats.cache_save_seconds += time.perf_counter() - start
        return more

    def _save_gemm_choices(self) -> None:
        from hattn.kernels.gemm.op import choices

        rows, file = choices(), self.path / GEMM_CHOICES
        if rows and (not file.is_file() or json.loads(file.read_text()) != rows):
            _write(file, json.dumps(rows, indent=1).encode())

    def _load_gemm_choices(self) -> None:
        from hattn.kernels.gemm.op import load_choices

        file = self.path / GEMM_CHOICES
        if file.is_file():
            try:
                load_choices(json.loads(file.read_text()))
            except (ValueError, KeyError, TypeError) as e:  # an entry written by another version: time again
                log.warning("hattn: the GEMM choices in %s could not be read (%s); timing those shapes", file, e)

    def _write(self, data: bytes, info) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write(self.path / KEY_FILE, json.dumps(self.fields, indent=1, sort_keys=True).encode())
        _write(self.path / ARTIFACTS, data)
        self.artifacts = _count(info)
        log.info("hattn: saved %d compiled artifacts to %s", self.artifacts, self.path)

    def keep(self, runtime: Callable, stats: Stats) -> Callable:
        """Save now (the graph's compiled pieces) and after the runtime's first call (inductor autotunes then)."""
        self.save(stats)
        return _SaveAfterFirstCall(runtime, self, stats)


class _SaveAfterFirstCall:
    """A runtime whose first call saves its graph's entry again."""

    def __init__(self, runtime: Callable, entry: ArtifactEntry, stats: Stats):
        self.runtime, self.entry, self.stats = runtime, entry, stats

    def __getattr__(self, name: str):  # the runtime's own attributes stay reachable
        if name == "runtime":
            raise AttributeError(name)
        return getattr(self.runtime, name)

    def __call__(self, *args):
        out = self.runtime(*args)
        if self.entry is not None:
            entry, self.entry = self.entry, None
            entry.save(self.stats)
        return out


def load_entry(gm: fx.GraphModule, example_inputs: list, config, stats: Stats) -> ArtifactEntry:
    """The graph's entry in config.cache_dir, loaded into torch's caches if it exists (a hit or a miss counted)."""
    off = torch_caches_off()
    if off:
        log.warning("hattn: cache_dir=%s cannot warm-start: torch's caches are off (%s); turn them back on",
                    config.cache_dir, ", ".join(off))
    entry = entry_for(config.cache_dir, gm, example_inputs, config)
    entry.load(stats)
    return entry


def keep_kernels_in(cache_dir: str) -> str:
    """Point Triton's cache (compiled kernels and autotuning results: fla's, hattn's and inductor's) at
    `cache_dir/triton`, unless TRITON_CACHE_DIR already names one; returns the directory in use.

    torch's artifacts hold what inductor compiled, not the Triton kernels that run outside it (fla's chunk path, the
    split ops' kernels), and fla autotunes those at their first call: without this a warm start on a new machine
    compiles and autotunes them again (tens of seconds). Triton keys its entries by kernel source, signature,
    Triton version and target, so an entry that does not fit is never used. Sets the process's environment (Triton
    reads it at each compile)."""
    same_triton_toolchain()
    chosen = os.environ.get("TRITON_CACHE_DIR")
    if chosen:
        return chosen
    path = os.path.join(os.path.abspath(cache_dir), "triton")
    if not _writable(path):  # Triton writes each kernel it compiles there (and fails on a read-only directory)
        digest = hashlib.sha256(path.encode()).hexdigest()[:16]
        shipped, path = path, os.path.join(tempfile.gettempdir(), f"hattn-triton-{digest}")
        if os.path.isdir(shipped):
            shutil.copytree(shipped, path, dirs_exist_ok=True)
        log.warning("hattn: %s cannot be written; Triton's kernel cache is a copy of it in %s", shipped, path)
    os.makedirs(path, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = path
    log.info("hattn: Triton's kernel cache is %s (cache_dir)", path)
    return path


def _writable(path: str) -> bool:
    """Whether files can be made in `path` (made if missing): tried, since root may not write a read-only mount."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def same_triton_toolchain() -> None:
    """Set the ptxas (and libdevice, where torch's config asks for CUDA's) Triton compiles with as inductor sets
    them, before anything compiles.

    Inductor points Triton at torch's own ptxas (and, with `eager_numerics.use_pytorch_libdevice` or
    `emulate_precision_casts`, at CUDA's libdevice), but only when it compiles a kernel itself. Both are in
    Triton's cache keys: ptxas's version in every kernel's and autotuning result's key, libdevice's file hash in
    the options'. So a process whose inductor compiled early (a cold start) keyed fla's and hattn's kernels
    differently from one whose pieces all came from torch's cache (a warm start), which then found none of them:
    the H100's warm start compiled ~60 kernels and autotuned fla's chunk kernels again (~42 s). Set first, every
    process keys them alike. Triton fixes ptxas's version at a process's first compile (`get_ptxas_version` is
    cached), so this must run before any Triton kernel compiles: `keep_kernels_in` (before the model loads, in
    `hattn generate`) and each graph compile (before its pieces and first run) call it. torch's private setters,
    idempotent; absent or failing ones are skipped (the keys are then as before)."""
    try:
        from torch._inductor.runtime import compile_tasks
    except ImportError:
        return
    for name in ("_set_triton_ptxas_path", "_set_triton_libdevice_path"):
        setter = getattr(compile_tasks, name, None)
        if setter is None:
            continue
        try:
            setter()
        except Exception as e:  # noqa: BLE001  (a toolchain torch cannot find: Triton's own is used, as before)
            log.debug("hattn: torch's %s failed (%r)", name, e)


def entries(cache_dir) -> list[Path]:
    """The graphs' entries in `cache_dir` (directories holding a key.json), sorted; not Triton's cache beside them."""
    return sorted(p for p in Path(cache_dir).iterdir() if (p / KEY_FILE).is_file())


def entry_for(cache_dir: str, gm: fx.GraphModule, example_inputs: list, config) -> ArtifactEntry:
    """The entry of Dynamo graph `gm` compiled with `config` (see the module docstring for what its key covers)."""
    fields = key_fields(gm, example_inputs, config)
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
    return ArtifactEntry(Path(cache_dir) / key, fields)


def key_fields(gm: fx.GraphModule, example_inputs: list, config) -> dict:
    placeholders = gm.graph.find_nodes(op="placeholder")
    examples = [n.meta.get("example_value", x) for n, x in zip(placeholders, example_inputs, strict=True)]
    return {
        "graph": signature(gm, examples, strict=False),
        "mode": config.mode,
        "inner_compiler": config.inner_compiler,
        "capture_sizes": list(config.capture_sizes),
        "passes": {name: getattr(config, name) for name in ("fuse_linears", "small_m_gemm", "gated_mlp")},
        "hattn": hattn_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "device": device_name(example_inputs),
    }


@functools.cache
def hattn_version() -> str:
    """hattn's version and a digest of its source files (an editable install changes without a version bump)."""
    import hattn

    root = Path(hattn.__file__).parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return f"{hattn.__version__}+{digest.hexdigest()[:16]}"


def device_name(example_inputs: list) -> str:
    """The device the graph runs on: a CUDA device's name and capability; a CPU's architecture."""
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} sm_{major}{minor}"
    return f"{device.type} {platform.machine()} {sys.platform}"


def torch_caches_off() -> list[str]:
    """torch settings that make a cache_dir useless (each cache torch would skip), as the names a user sets."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    off = ["torch._inductor.config.force_disable_caches"] if inductor_config.force_disable_caches else []
    if not inductor_config.fx_graph_cache:
        off.append("torch._inductor.config.fx_graph_cache")
    if not functorch_config.enable_autograd_cache:
        off.append("torch._functorch.config.enable_autograd_cache")
    return off


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _count(info) -> int:
    return sum(len(keys) for keys in info.artifacts.values())


def _write(file: Path, data: bytes) -> None:
    """Write atomically: a process loading the entry meanwhile reads the old file or the new one, never half."""
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, file)
