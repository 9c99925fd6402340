"""hattn's split ops, one module per kind: `full`, `linear`, `kda`, `lightning`, `mamba2`, `short_conv`.

A kind's module defines its `torch.library` custom op (written into a caller-provided `out`, so graph runtimes own
every address), the op's fake, its cache spec (`cache_spec(...) -> LayerSpec`), and registers op, kind,
`capture_safe` and `direct` with the registry. Its kernels live in `hattn/kernels/<algorithm>/`. Adding a kind is
one module here plus its kernels folder; importing this package registers every kind.
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
