"""Import only the flash-linear-attention kernels a model uses.

transformers' gated-delta-net and KDA modules import `fla.ops.<family>` when they load (their kernel fallback), and
Python runs `fla/ops/__init__.py` first, which imports every one of fla's ~30 op families: ~270 modules and ~390
Triton functions, 0.6-1 s of every process that builds such a model (issue 21's warm start), for the one or two
families it calls. `defer_package_init("fla.ops")` puts a module in its place whose names load on first use: the
submodule a caller imports, or the one that `fla/ops/__init__.py` names for an attribute (`fla.ops.chunk_gla`), and
nothing else. `HATTN_LAZY_FLA=0` turns it off.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
import types

_ENV = "HATTN_LAZY_FLA"


def defer_fla_ops() -> bool:
    """`defer_package_init("fla.ops")` unless HATTN_LAZY_FLA=0; True if it took effect."""
    if os.environ.get(_ENV, "1") == "0":
        return False
    return defer_package_init("fla.ops")


def defer_package_init(name: str) -> bool:
    """Register `name` (a subpackage, e.g. "fla.ops") as a module whose attributes import on first use, in place of
    running its `__init__.py`. Only an `__init__` of relative `from .x import y` statements (and a docstring and
    `__all__`) is replaced: anything else in it might be a side effect someone needs. Returns False, doing nothing,
    where the package is missing, already imported, or its `__init__` is not of that form."""
    parent_name, _, child = name.rpartition(".")
    if name in sys.modules or not parent_name:
        return False
    try:
        if importlib.util.find_spec(parent_name) is None:
            return False
        parent = importlib.import_module(parent_name)
    except ImportError:
        return False
    if name in sys.modules:  # the parent's own __init__ imported it
        return False
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        return False
    names = _reexports(spec.origin)
    if names is None:
        return False
    module = importlib.util.module_from_spec(spec)  # __path__, __file__, __spec__; its code is not run
    module.__all__ = list(names)
    module.__getattr__ = _loader(module, names)
    module.__dir__ = lambda: sorted(set(module.__dict__) | set(names))
    sys.modules[name] = module
    setattr(parent, child, module)
    return True


def _reexports(init_path: str) -> dict[str, tuple[str, str]] | None:
    """{public name: (the submodule that defines it, its name there)} of an `__init__.py` of relative imports, else
    None."""
    try:
        with open(init_path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None
    names: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.update({a.asname or a.name: (node.module, a.name) for a in node.names if a.name != "*"})
            if any(a.name == "*" for a in node.names):
                return None
        elif isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            continue
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # the docstring
            continue
        else:
            return None
    return names


def _loader(module: types.ModuleType, names: dict[str, tuple[str, str]]):
    def __getattr__(attr: str):
        if attr in names:
            submodule, defined_as = names[attr]
            value = getattr(importlib.import_module(f"{module.__name__}.{submodule}"), defined_as)
        elif not attr.startswith("__") and _is_submodule(module, attr):
            value = importlib.import_module(f"{module.__name__}.{attr}")
        else:
            raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}")
        setattr(module, attr, value)
        return value
    return __getattr__


def _is_submodule(module: types.ModuleType, attr: str) -> bool:
    return any(os.path.exists(os.path.join(d, attr, "__init__.py")) or os.path.exists(os.path.join(d, f"{attr}.py"))
               for d in module.__path__)
