"""The package's structure: one-way layers, module paths, caches.

`keras_bptt` is layered (docs/architecture.md): planning (NumPy only) →
execution (TensorFlow) → layers (Keras) → monitoring and the CLI. A module
may import its own layer and the ones before it, never a later one.
"""

import ast
import importlib
import pathlib
import re
import subprocess
import sys
import types
import warnings

import pytest

import keras_bptt

PACKAGE = pathlib.Path(keras_bptt.__file__).parent
CHANGELOG = PACKAGE.parent / "CHANGELOG.md"
LAYERS = ("planning", "execution", "layers", "monitoring")
# Top-level modules: the command line and the public re-exporting modules
# (`budget`, `callbacks`) sit above everything.
TOP_LEVEL = dict.fromkeys(
    ("cli", "__main__", "__init__", *keras_bptt.PUBLIC_MODULES), len(LAYERS))


def _rank(dotted):
    """The layer index of a `keras_bptt...` module name."""
    parts = dotted.split(".")
    if len(parts) == 1:  # `from keras_bptt import X`: resolved below
        return None
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return TOP_LEVEL[parts[1]]


def _imports(path):
    """`keras_bptt...` modules a file imports (module-level and in functions)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("keras_bptt"):
                    yield alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "keras_bptt"
        ):
            if node.module == "keras_bptt":
                for alias in node.names:
                    lazy = keras_bptt._LAZY_ATTRIBUTES.get(alias.name)
                    yield lazy or f"keras_bptt.{alias.name}"
            else:
                yield node.module


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in LAYERS:
            yield path, LAYERS.index(relative.parts[0])
        else:
            yield path, TOP_LEVEL[relative.stem]


@pytest.mark.parametrize(
    "path, rank", list(_modules()), ids=lambda v: str(v) if isinstance(v, int) else
    str(v.relative_to(PACKAGE))
)
def test_dependencies_point_one_way(path, rank):
    for name in _imports(path):
        target = _rank(name)
        assert target is not None and target <= rank, (
            f"{path.relative_to(PACKAGE)} (layer {rank}) imports {name} "
            f"(layer {target}); see docs/architecture.md"
        )


def test_planning_never_imports_tensorflow():
    modules = sorted(
        f"keras_bptt.planning.{p.stem}"
        for p in (PACKAGE / "planning").glob("*.py")
        if p.stem != "__init__"
    )
    code = (
        f"import importlib, sys\nfor name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "import keras_bptt, keras_bptt.cli, keras_bptt.budget\n"
        "keras_bptt.clear_caches()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras')]\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _removed_paths():
    """`(old, new)` rows of the table of paths removed in 0.3.0 (CHANGELOG.md)."""
    rows = re.findall(r"^\s*\| `(keras_bptt\.\w+)` \| `(keras_bptt\.[\w.]+)` \|$",
                      CHANGELOG.read_text(), re.M)
    assert len(rows) == 18, rows
    return rows


def test_old_module_paths_are_gone_and_their_new_paths_import():
    for old, new in _removed_paths():
        assert old.split(".")[1] not in keras_bptt.PUBLIC_MODULES, old
        sys.modules.pop(old, None)
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
        assert not hasattr(keras_bptt, old.split(".")[1]), old
        assert importlib.import_module(new).__name__ == new
    assert not hasattr(keras_bptt, "MOVED_MODULES")
    assert not any(type(finder).__module__ == "keras_bptt" for finder in sys.meta_path)


@pytest.mark.parametrize("public, home", sorted(keras_bptt.PUBLIC_MODULES.items()))
def test_public_modules_re_export_their_homes_without_warning(public, home):
    sys.modules.pop(f"keras_bptt.{public}", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = importlib.import_module(f"keras_bptt.{public}")
        assert getattr(keras_bptt, public) is module
    home_module = sys.modules[home]
    public_names = [
        name for name, value in vars(home_module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
        and getattr(value, "__module__", home) == home
    ]
    assert public_names
    for name in public_names:
        assert getattr(module, name) is getattr(home_module, name), name


def test_the_public_paths_documented_in_the_readme_import():
    import keras_bptt.budget
    from keras_bptt.callbacks import BudgetMonitor

    from keras_bptt.monitoring import callbacks
    from keras_bptt.planning import budget

    assert keras_bptt.budget.Budget is budget.Budget
    assert keras_bptt.budget.parse_budget("25%") == budget.parse_budget("25%")
    assert BudgetMonitor is callbacks.BudgetMonitor


def test_unknown_attributes_still_raise():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        keras_bptt.nothing  # noqa: B018
    with pytest.raises(ModuleNotFoundError):
        __import__("keras_bptt.nothing")


def test_every_caching_module_can_be_cleared():
    # Every module-level cache is reachable from `clear_caches()`.
    for name in keras_bptt._CACHING_MODULES:
        module = __import__(name, fromlist=["_"])
        assert callable(module.clear_caches), name
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "lru_cache" in text or "_RECENT_TABLES = " in text or "_CALIBRATIONS = " in text:
            name = ".".join(("keras_bptt",) + path.relative_to(PACKAGE).with_suffix("").parts)
            assert name in keras_bptt._CACHING_MODULES, name


def test_clear_caches_empties_the_plan_caches():
    from keras_bptt.execution import program
    from keras_bptt.planning import budget
    from keras_bptt.planning import planner

    plan = planner.make_plan(200, 12, scheme="msm", alpha=3.0)
    program.program_for(200, 2, budget=budget.parse_budget("10%"),
                        scheme="hsm", state_bytes=64, alpha=1.0)
    assert planner._cached_plan.cache_info().currsize > 0
    assert program.program_for.cache_info().currsize > 0
    keras_bptt.clear_caches()
    assert planner._cached_plan.cache_info().currsize == 0
    assert program.program_for.cache_info().currsize == 0
    assert planner.make_plan(200, 12, scheme="msm", alpha=3.0).cost == plan.cost
