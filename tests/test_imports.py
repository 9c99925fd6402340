"""hattn.imports: a package's `__init__` of re-exports replaced by one whose names load on first use."""
import importlib.util
import itertools
import os
import subprocess
import sys
import textwrap

import pytest

import hattn.imports as imports

_ids = itertools.count()


@pytest.fixture
def make_pkg(tmp_path, monkeypatch):
    """A package `<name>` with a subpackage `ops` whose __init__ is `init` and families a (fa) and b (fb, gb)."""
    made = []

    def make(init="from .a import fa\nfrom .b import fb, gb as g2\n__all__ = ['fa', 'fb', 'g2']\n", parent_init=""):
        name = f"lazypkg{next(_ids)}"
        root = tmp_path / name / "ops"
        (root / "b").mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text(parent_init.replace("PKG", name))
        (root / "__init__.py").write_text(init)
        (root / "a.py").write_text("def fa():\n    return 'a'\n")
        (root / "b" / "__init__.py").write_text("def fb():\n    return 'b'\n\ndef gb():\n    return 'g'\n")
        (root / "broken").mkdir()
        (root / "broken" / "__init__.py").write_text("import no_such_module_anywhere\n")
        made.append(name)
        return name

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for key in [k for k in sys.modules if any(k == n or k.startswith(n + ".") for n in made)]:
        del sys.modules[key]
    sys.meta_path[:] = [f for f in sys.meta_path if not any(getattr(f, "name", "").startswith(n) for n in made)]


def deferred(module) -> bool:
    return "__getattr__" in vars(module)


def test_a_deferred_init_loads_only_the_family_imported(make_pkg):
    name = make_pkg()
    assert imports.defer_package_init(f"{name}.ops")
    assert name not in sys.modules  # nothing is imported until someone imports it
    fa = importlib.import_module(f"{name}.ops.a").fa
    assert fa() == "a" and deferred(sys.modules[f"{name}.ops"])
    assert f"{name}.ops.b" not in sys.modules  # the eager __init__ would have imported it
    assert not imports.defer_package_init(f"{name}.ops")  # imported now: nothing to do


def test_a_parent_that_imports_the_package_itself_gets_the_deferred_one(make_pkg):
    name = make_pkg(parent_init="from PKG.ops.a import fa\n")  # as fla's __init__ does with fla.layers installed
    assert imports.defer_package_init(f"{name}.ops")
    importlib.import_module(name)
    assert deferred(sys.modules[f"{name}.ops"]) and f"{name}.ops.b" not in sys.modules


def test_the_eager_init_loads_every_family(make_pkg):  # the control: what the deferral saves
    name = make_pkg()
    importlib.import_module(f"{name}.ops.a")
    assert f"{name}.ops.b" in sys.modules


def test_a_deferred_package_serves_its_names_submodules_and_dir(make_pkg):
    name = make_pkg()
    assert imports.defer_package_init(f"{name}.ops")
    ops = importlib.import_module(f"{name}.ops")
    assert importlib.import_module(name).ops is ops
    assert ops.fb() == "b" and ops.g2() == "g"  # re-exported names, an alias among them
    assert f"{name}.ops.b" in sys.modules
    assert ops.a.fa() == "a"  # a submodule as an attribute
    exec(f"from {name}.ops import fa; assert fa() == 'a'", {})
    assert {"fa", "fb", "g2"} <= set(dir(ops)) and ops.__all__ == ["fa", "fb", "g2"]
    assert "fb" in vars(ops)  # kept once loaded
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ops.nothing
    assert getattr(ops, "broken", None) is None and not hasattr(ops, "broken")  # a submodule that fails to import


@pytest.mark.parametrize("init", [
    "from .a import fa\nprint('a side effect')\n",  # anything but re-exports may be needed: the init runs
    "from .a import *\n",
    "from os import path\n",
    "from ..ops.a import fa\n",  # not relative to the package itself
])
def test_an_init_that_does_more_than_reexport_is_left_to_run(make_pkg, init, capsys):
    name = make_pkg(init + "RAN = True\n")
    imports.defer_package_init(f"{name}.ops")
    ops = importlib.import_module(f"{name}.ops")
    assert ops.RAN and not deferred(ops)


def test_nothing_is_deferred_when_imported_already(make_pkg):
    name = make_pkg()
    importlib.import_module(f"{name}.ops")
    assert not imports.defer_package_init(f"{name}.ops")
    assert not imports.defer_package_init("toplevel")
    assert imports.defer_package_init(f"{name}.no_such_sub")  # a finder that never finds: the import fails as before
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"{name}.no_such_sub")


def test_hattn_lazy_fla_0_turns_it_off(monkeypatch):
    calls = []
    monkeypatch.setattr(imports, "defer_package_init", lambda name: calls.append(name) or True)
    monkeypatch.setenv("HATTN_LAZY_FLA", "0")
    assert not imports.defer_fla_ops() and calls == []
    monkeypatch.delenv("HATTN_LAZY_FLA")
    assert imports.defer_fla_ops() and calls == ["fla.ops"]


@pytest.mark.gpu  # fla is installed with the GPU extras only: a CPU CI never has it
@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="flash-linear-attention is not installed")
def test_importing_hattn_keeps_fla_to_the_families_a_model_imports():
    code = textwrap.dedent("""
        import sys
        import hattn
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        import fla.ops
        assert fla.ops.chunk_gated_delta_rule is chunk_gated_delta_rule
        assert "fla.ops.kda" not in sys.modules and "fla.ops.rwkv7" not in sys.modules, sorted(sys.modules)
        assert fla.ops.chunk_kda.__module__.startswith("fla.ops.kda")
    """)
    env = {k: v for k, v in os.environ.items() if k != "HATTN_LAZY_FLA"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
