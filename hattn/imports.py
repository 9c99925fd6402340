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
import importlib.abc
import importlib.machinery
import os
import sys
import threading
import types

_ENV = "HATTN_LAZY_FLA"


def defer_fla_ops() -> bool:
    """`defer_package_init("fla.ops")` unless HATTN_LAZY_FLA=0; True if it took effect."""
    if os.environ.get(_ENV, "1") == "0":
        return False
    return defer_package_init("fla.ops")


def defer_package_init(name: str) -> bool:
    """Have the first import of `name` (a subpackage, e.g. "fla.ops") make a module whose attributes import on first
    use, in place of running its `__init__.py`. Nothing is imported now: a finder on `sys.meta_path` waits for it,
    so importing hattn never imports fla, and a parent whose own `__init__` imports the subpackage gets the deferred
    one too. Only an `__init__` of relative `from .x import y` statements (and a docstring and `__all__`) is
    replaced: anything else in it might be a side effect someone needs, and then it runs as usual. Returns False,
    doing nothing, where `name` is imported already or a finder for it is in place."""
    if "." not in name or name in sys.modules or any(isinstance(f, _Deferred) and f.name == name
                                                     for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _Deferred(name))
    return True


class _Deferred(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `name` as the path finder does and loads it as a deferred module where its `__init__` allows."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or spec.submodule_search_locations is None:
            return None
        names = _reexports(spec.origin)
        if names is None:
            return None  # the import system goes on to the path finder: the __init__ runs
        spec.loader, spec.loader_state = self, names
        return spec

    def create_module(self, spec):
        return None  # the default module: __path__, __file__, __spec__ from the spec

    def exec_module(self, module):
        names = module.__spec__.loader_state
        module.__all__ = list(names)
        module.__getattr__ = _loader(module, names)
        module.__dir__ = lambda: sorted(set(module.__dict__) | set(names))


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
            if any(a.name == "*" for a in node.names):
                return None
            names.update({a.asname or a.name: (node.module, a.name) for a in node.names})
        elif isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            continue
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # the docstring
            continue
        else:
            return None
    return names


_LOADING = threading.RLock()  # first touches from several threads import one family at a time, as the eager init did


def _loader(module: types.ModuleType, names: dict[str, tuple[str, str]]):
    def __getattr__(attr: str):
        with _LOADING:
            if attr in module.__dict__:  # another thread loaded it meanwhile
                return module.__dict__[attr]
            if attr in names:
                submodule, defined_as = names[attr]
                value = getattr(importlib.import_module(f"{module.__name__}.{submodule}"), defined_as)
            elif not attr.startswith("__") and importlib.machinery.PathFinder.find_spec(
                    f"{module.__name__}.{attr}", module.__path__) is not None:
                try:
                    value = importlib.import_module(f"{module.__name__}.{attr}")
                except ImportError as e:  # as the eager init: an attribute that is not there (hasattr -> False)
                    raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r} ({e})") from e
            else:
                raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}")
            setattr(module, attr, value)
            return value
    return __getattr__

