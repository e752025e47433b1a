"""The package's import rules, read from the source (nothing is imported): no import cycle
between modules, and the lower layers (models, data, objectives) never import the training
code above them; and no module is over 400 lines."""

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "xmodal_jax")
LOWER = ("xmodal_jax.models", "xmodal_jax.data", "xmodal_jax.objectives")
UPPER = ("xmodal_jax.train", "xmodal_jax.tasks", "xmodal_jax.evaluators", "xmodal_jax.main",
         "xmodal_jax.tables", "xmodal_jax.bench")  # fmt: skip


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _module_level_imports(name: str) -> set[str]:
    """The package modules `name` imports when it is imported (imports inside functions, which
    run later, do not count)."""
    with open(MODULES[name]) as f:
        tree = ast.parse(f.read())
    package = name if MODULES[name].endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
            # `from pkg import sub` needs the module `sub` (pkg's __init__ may be mid-import);
            # `from mod import name` needs `mod`.
            found |= subs if len(subs) == len(node.names) else subs | {base}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _module_level_imports(name) for name in MODULES}


def test_the_graph_is_read():
    assert len(GRAPH) > 50
    assert "xmodal_jax.tasks" in GRAPH["xmodal_jax.tasks.classification"]
    assert "xmodal_jax.evaluators.zeroshot" in GRAPH["xmodal_jax.evaluators.gzsl"]


def test_no_import_cycle():
    done, stack = set(), []

    def visit(name):
        if name in stack:
            cycle = stack[stack.index(name) :] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        stack.append(name)
        for dep in sorted(GRAPH[name]):
            visit(dep)
        stack.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)


@pytest.mark.parametrize("lower", LOWER)
def test_lower_layers_never_import_training_code(lower):
    for name, deps in GRAPH.items():
        if name == lower or name.startswith(lower + "."):
            bad = sorted(d for d in deps if d.startswith(UPPER))
            assert not bad, f"{name} imports {bad}"


def test_experiments_import_helpers_by_module_path():
    """Configs share helpers as `experiments.<folder>.<module>`: no file under experiments/
    edits the import path, and every folder holding configs is a package."""
    for folder, _, files in os.walk(os.path.join(ROOT, "experiments")):
        configs = [f for f in files if f.endswith(".py")]
        if not configs or os.path.basename(folder) == "results":  # results/: scripts
            continue
        assert "__init__.py" in configs, f"{folder} is not a package"
        for name in configs:
            with open(os.path.join(folder, name)) as f:
                assert "sys.path" not in f.read(), os.path.join(folder, name)


def test_configs_of_two_folders_each_get_their_own_helper(tmp_path):
    """Two packages with a `common.py` each (the clash a `sys.path` insert caused): each
    config imports its own, by module path; a config outside a package imports beside it."""
    from xmodal_jax import config as config_lib

    for sub, value in (("a", 1), ("b", 2)):
        folder = tmp_path / "exps" / sub
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        (folder / "common.py").write_text(f"VALUE = {value}\n")
        (folder / "cfg.py").write_text(f"from exps.{sub} import common\n")
    (tmp_path / "exps" / "__init__.py").write_text("")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "helper.py").write_text("VALUE = 3\n")
    (tmp_path / "loose" / "cfg.py").write_text("import helper\n")
    a = config_lib.exec_file(str(tmp_path / "exps" / "a" / "cfg.py"), "x_")
    b = config_lib.exec_file(str(tmp_path / "exps" / "b" / "cfg.py"), "x_")
    loose = config_lib.exec_file(str(tmp_path / "loose" / "cfg.py"), "x_")
    assert (a.common.VALUE, b.common.VALUE, loose.helper.VALUE) == (1, 2, 3)
    assert (a.__name__, loose.__name__) == ("exps.a.cfg", "x_cfg")
    assert str(tmp_path) not in sys.path  # the import path is restored


@pytest.mark.parametrize(
    "package, never",
    [
        ("xmodal_jax.tasks", ("xmodal_jax.train", "xmodal_jax.evaluators")),
        ("xmodal_jax.evaluators", ("xmodal_jax.tasks", "xmodal_jax.train.trainer")),
    ],
)
def test_tasks_and_evaluators_stay_apart_from_the_loop(package, never):
    """Tasks and evaluators are found through their registries; neither imports the trainer,
    and evaluators are handed a task object instead of importing task modules."""
    for name, deps in GRAPH.items():
        if name == package or name.startswith(package + "."):
            bad = sorted(d for d in deps if d.startswith(never))
            assert not bad, f"{name} imports {bad}"


def _all_imports(name: str) -> set[str]:
    """Every package module `name` imports, at module level or inside a function."""
    with open(MODULES[name]) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found |= subs if len(subs) == len(node.names) else subs | {node.module}
    return {m for m in found if m in MODULES and m != name}


# docs/DESIGN.md's package map: what each of these subpackages may import besides itself,
# `errors` and the package's own `__init__`.
ALLOWED = {
    "xmodal_jax.data": ("xmodal_jax.timing",),
    "xmodal_jax.analysis": (),
    "xmodal_jax.evaluation": (),
    "xmodal_jax.tables": ("xmodal_jax.train.metrics", "xmodal_jax.train.workdir_lock",
                          "xmodal_jax.config", "xmodal_jax.provenance", "xmodal_jax.cache_dirs"),
}  # fmt: skip


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_subpackages_import_what_the_package_map_lists(package):
    allowed = (package, "xmodal_jax.errors", *ALLOWED[package])
    for name in MODULES:
        if name == package or name.startswith(package + "."):
            bad = sorted(
                d for d in _all_imports(name)
                if d != "xmodal_jax" and not any(d == a or d.startswith(a + ".") for a in allowed)
            )  # fmt: skip
            assert not bad, f"{name} imports {bad}; docs/DESIGN.md's package map lists {allowed}"


def test_no_module_of_the_package_is_over_400_lines():
    """A module a reader can hold in their head: past 400 lines, split it by what it does."""
    long = {}
    for name, path in MODULES.items():
        with open(path) as f:
            n = sum(1 for _ in f)
        if n > 400:
            long[name] = n
    assert not long, f"split these modules: {long}"
