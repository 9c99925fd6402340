"""Small-M GEMMs (M <= 64 rows, the decode step's projections): a Triton skinny GEMM (`skinny.py`, Triton only),
its torch reference (`reference.py`), the `hattn_kernels::linear` op that picks cuBLAS or the Triton kernel per
shape (`op.py`) and the cuBLAS-vs-Triton sweep (`bench.py`, CUDA only)."""
from hattn.kernels.gemm.op import choices, linear, load_choices

__all__ = ["choices", "linear", "load_choices"]
