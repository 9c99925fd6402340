"""Chunked gated delta rule for packed prefill on CUDA, through flash-linear-attention (imported lazily).

fla (`fla-core==0.6.0`, the `gpu` extra) is imported only on the first CUDA prefill: CPU installs never have it
(transformers routes its own GatedDeltaNet to fla whenever `import fla` works, breaking HF's CPU path).
Facts checked in fla-core 0.6.0's source (and by tests/kernels/test_gpu_kernels.py::test_fla_facts_*):
`chunk_gated_delta_rule` is `@torch.compiler.disable`d, wants B == 1 with `cu_seqlens`, maps value head h to key
head h // (Hv // Hk) (as repeat_interleave), takes log-space `g` and post-sigmoid `beta`, and allocates a *new*
fp32 final state `[N, Hv, Dk, Dv]`; so its state pass is replaced by ours (`state_pass.py`: fla's kernel reading
and writing the cache's slots), or, with `slot_states` off, fed states gathered from the slots and its final states
scattered back. Its public function wraps `chunk_gated_delta_rule_fwd` in an autograd Function whose `input_guard`
copies every non-contiguous input and whose `use_qk_l2norm_in_kernel` runs two extra normalisation kernels. We
call the forward alone (`_fla_forward`: `chunk_gated_delta_rule_fwd`'s stages) with q, k already normalised and q, k,
v contiguous, written so by our conv (`packed_conv_qkv`), and with the chunk indices and offsets built once per step
(`PackedBatch.memo`).

Inside a CUDA graph (a padded `PackedBatch`, `mode="full"`): the chunk indices come padded with the batch (fla's
own `prepare_chunk_indices` has a data-dependent size), and fla's identity-keyed tensor cache is switched off for
the call: it would hand the capture the chunk offsets computed at warm-up from the same static `cu`, so replays
would read the warm-up's offsets instead of recomputing them from this step's.

fla autotunes each chunk kernel at its first call: every config compiled and timed, ~42 s on a cold Triton cache at
the 1B preset's shape on the H200, paid by full mode's first packed capture and pcg/bcg's first long prefill.
`fla_configs/<GPU>/` holds the configs that autotuning chose there, in fla's own format; `use_shipped_configs` points
fla at them (FLA_CACHE_MODE=strict: a kernel whose exact autotuning key -- head counts, head dims, chunk size, the
dtypes of its tensors, the int64 offsets included -- is not in the file autotunes as before), ~6 s instead. Only
the model's own calls make those keys: `scripts/fla_configs.py --from-logs` writes the files from the choices Triton
printed in runs of the model (docs/benchmarks.md, thirtieth session: where the H100's came from, and why the H200's
were removed). A user's own FLA_CONFIG_DIR or FLA_CACHE_MODE wins. fla also keeps its autotuning results in
Triton's cache (`cache_results`), which `cache_dir` keeps.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
from pathlib import Path

import torch

from hattn.kernels.packing import CHUNK, PackedBatch

SHIPPED_CONFIGS = Path(__file__).parent / "fla_configs"
log = logging.getLogger("hattn")


@functools.cache
def fla_chunk():
    """fla's chunk_gated_delta_rule, or None where fla is not installed (CPU installs never have it)."""
    if fla_installed():
        use_shipped_configs(_gpu_name())
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    return chunk_gated_delta_rule


def fla_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("fla") is not None


def _gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def config_dir_for(gpu_name: str | None) -> Path | None:
    """hattn's directory of fla configs for a GPU of this name (named as fla names it), or None."""
    if not gpu_name:
        return None
    path = SHIPPED_CONFIGS / (re.sub(r"[^0-9A-Za-z]+", "_", gpu_name).strip("_") or "unknown_gpu")
    return path if path.is_dir() else None


def use_shipped_configs(gpu_name: str | None) -> Path | None:
    """Make fla read the autotuning results hattn ships for this GPU (strict key match), unless the user set
    FLA_CONFIG_DIR or FLA_CACHE_MODE; returns the directory now in use, or None. Sets the process's environment
    (fla reads FLA_CONFIG_DIR at each lookup and FLA_CACHE_MODE at import) and, where fla is already imported
    (transformers imports it for its own layers), fla's mode."""
    path = config_dir_for(gpu_name)
    if path is None or "FLA_CONFIG_DIR" in os.environ or "FLA_CACHE_MODE" in os.environ:
        return None
    os.environ["FLA_CONFIG_DIR"], os.environ["FLA_CACHE_MODE"] = str(path), "strict"
    cache = sys.modules.get("fla.ops.utils.cache")
    if cache is not None:
        cache.FLA_CACHE_MODE = cache.FlaCacheMode.STRICT
    log.info("hattn: fla reads its kernels' configs from %s (autotuned there once; FLA_CACHE_MODE=strict)", path)
    return path


def _chunk_indices(batch: PackedBatch) -> torch.Tensor:
    from fla.ops.utils.index import prepare_chunk_indices

    return prepare_chunk_indices(batch.cu, CHUNK, cu_seqlens_cpu=batch.cu_cpu)


def _chunk_offsets(batch: PackedBatch) -> torch.Tensor:
    from fla.ops.utils.index import prepare_chunk_offsets

    return prepare_chunk_offsets(batch.cu, CHUNK)


def _fla_forward(q, k, v, g, beta, h0, stateful: bool, cu, chunk_indices, chunk_offsets, out=None, slots=None):
    """fla 0.6.0's `chunk_gated_delta_rule_fwd` (gate outside the kernel, no context parallelism), stage by stage, so
    that its state pass takes the step's chunk offsets (fla's own function derives them from `cu` in every layer,
    about eight small launches that its tensor cache cannot spare inside a graph, where it is off) and its output
    pass writes `out` [1, T, Hv, Dv] when given (fla's allocates a new tensor, which the caller then copied).
    `slots`: (states [S, Hv, Dk, Dv] fp32, slots [N], has_state [N], whether any sequence may continue a state): the
    state pass reads and writes the states in the cache's slots (`state_pass.py`; h0 and stateful unused, no final
    states returned); None: fla's pass."""
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    at = dict(cu_seqlens=cu, chunk_indices=chunk_indices, chunk_size=CHUNK)
    g = chunk_local_cumsum(g, scale=RCP_LN2, **at)
    w, u, a = chunk_gated_delta_rule_fwd_intra(k=k, v=v, g=g, beta=beta, **at)
    del a  # fla's solved chunk matrices: the state pass reads w and u
    if slots is not None:
        from hattn.kernels.gated_delta.state_pass import state_pass

        states, slot_ids, has_state, continues = slots
        h, v_new = state_pass(k, w, u, g, states, slot_ids, has_state, cu, chunk_offsets, len(chunk_indices), CHUNK,
                              continues, v_in_u=True)  # u is read by this pass alone
        final = None
    else:
        h, v_new, final = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, g=g, initial_state=h0,
                                                       output_final_state=stateful, chunk_offsets=chunk_offsets, **at)
    del w, u  # the output pass's buffer (fla's own call) may take their memory
    return _output_pass(q, k, v_new, h, g, cu, chunk_indices, out), final


def _output_pass(q, k, v_new, h, g, cu, chunk_indices, out):
    """fla 0.6.0's `chunk_fwd_o` (scale Dk**-0.5, no g_gamma, states [K, V]), into `out` where it has v_new's layout
    (contiguous [1, T, Hv, Dv], v_new's dtype); else fla's own call, copied into `out` (or returned if None).
    Every row is written once either way: each chunk entry stores its rows, a zero-length sequence's none."""
    import triton
    from fla.ops.common.chunk_o import chunk_fwd_kernel_o, chunk_fwd_o

    scale = q.shape[-1] ** -0.5
    fits = out is not None and out.shape == v_new.shape and out.dtype == v_new.dtype
    if not (fits and out.is_contiguous() and v_new.is_contiguous()):  # the kernel addresses v and o alike
        o = chunk_fwd_o(q=q, k=k, v=v_new, h=h, g=g, scale=scale, cu_seqlens=cu, chunk_indices=chunk_indices,
                        chunk_size=CHUNK)
        return o if out is None else out.copy_(o)
    b, t, hk, dk = q.shape
    hv, dv = v_new.shape[2], v_new.shape[3]
    chunk_fwd_kernel_o[lambda meta: (triton.cdiv(dv, meta["BV"]) * len(chunk_indices), b * hv)](
        q=q, k=k, v=v_new, h=h, g=g, g_gamma=None, o=out, cu_seqlens=cu, chunk_indices=chunk_indices, scale=scale,
        T=t, H=hk, HV=hv, K=dk, V=dv, BT=CHUNK, STATE_V_FIRST=False,
    )
    return out


def chunk_gated_delta_rule_slots(q, k, v, g, beta, batch: PackedBatch, rec_state, out=None) -> torch.Tensor:
    """fla's chunked rule over the sequences of `batch`, its state pass reading and writing their slots (ours:
    `state_pass.py`; fla's between a gather and a scatter where `slot_states` is off or Dk > 256).

    q, k: [T, Hk, Dk], L2-normalised; v: [T, Hv, Dv]; all three contiguous; g (log decay), beta: [T, Hv];
    rec_state: [S, Hv, Dk, Dv] fp32 or None (start from zeros, keep nothing). out: [T, Hv, Dv] to write, or None.
    Returns o: [T, Hv, Dv] in v's dtype (`out` when given).
    """
    from hattn.kernels.gated_delta.state_pass import MAX_DK  # Triton: not on CPU installs, which import this module
    from hattn.kernels.gated_delta.states import gather_states

    stateful = rec_state is not None  # the conv before it checked that the batch then has slots
    chunk_indices = batch.memo("fla_chunk_indices", lambda: _chunk_indices(batch))
    chunk_offsets = batch.memo("fla_chunk_offsets", lambda: _chunk_offsets(batch))
    out = None if out is None else out[None]
    in_slots = stateful and slot_states and k.shape[-1] <= MAX_DK
    # a padded bucket's states are on the device: any sequence may continue one (a stateless batch has no has_state)
    continues = stateful and (batch.padded or any(batch.has_state))
    with torch.cuda.device(q.device), _no_fla_tensor_cache(batch.padded):
        h0 = None
        if stateful and not in_slots and continues:
            h0 = gather_states(rec_state, batch.slots_d, batch.has_state_d)  # new sequences start from zeros
        o, final = _fla_forward(q[None], k[None], v[None], g[None].float().contiguous(), beta[None].contiguous(),
                                h0, stateful, batch.cu, chunk_indices, chunk_offsets, out,
                                (rec_state, batch.slots_d, batch.has_state_d, continues) if in_slots else None)
    if stateful and not in_slots:
        rec_state.index_copy_(0, batch.slots_d, final)
    return o[0]


# True: the state pass reads and writes the cache's slots (state_pass.py); False: fla's own pass between a gather and
# a scatter (what ran before; a switch for an A/B in one process)
slot_states = True


@contextlib.contextmanager
def _no_fla_tensor_cache(off: bool):
    """fla's identity-keyed cache of metadata derived from cu_seqlens, switched off inside the block when `off`."""
    utils = sys.modules.get("fla.utils")
    before = getattr(utils, "FLA_DISABLE_TENSOR_CACHE", None)
    if off and utils is not None:
        utils.FLA_DISABLE_TENSOR_CACHE = True
    try:
        yield
    finally:
        if off and utils is not None:
            utils.FLA_DISABLE_TENSOR_CACHE = before
