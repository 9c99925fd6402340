"""One module per model family; importing this package registers every family (modules named `_*` are helpers).

Adding a family: add one file here that calls `hattn.models.hf.register_family(Family(...))`.
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
