import torch
from hattn.kernels.gemm import op
for (n, k) in [(1024, 2048), (1024, 3584), (5120, 1024), (7168, 1024), (8224, 1024)]:
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    rows = [op._measure(x, w, None) for _ in range(4)]
    print(n, k, [(c.backend, round(c.cublas_us, 2), round(c.triton_us, 2)) for c in rows], flush=True)
