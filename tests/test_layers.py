"""The package's layering: each layer imports only the layers before it in LAYERS (module-level and deferred
imports alike), no two modules import each other, and nothing but the public API lies at the package root."""
from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cliptrain"
LAYERS = ("base", "text", "models", "objectives", "data", "checkpoint", "evaluation", "training", "app")
ROOT_FILES = {"__init__.py", "__main__.py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every cliptrain module `path` imports, anywhere in the file (`from pkg import mod` counts mod when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cliptrain")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cliptrain") and not node.level:
            found.add(node.module)
            for alias in node.names:
                sub = PACKAGE.parent.joinpath(*node.module.split("."), alias.name)
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    found.add(f"{node.module}.{alias.name}")
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int | None:
    """The layer index of a module; None for the package root (the public API, which may import anything)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return None
    return LAYERS.index(parts[1])


def test_every_subpackage_is_a_layer():
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert subpackages == set(LAYERS)


def test_only_the_public_api_sits_at_the_package_root():
    loose = {p.name for p in PACKAGE.glob("*.py")} - ROOT_FILES
    assert not loose, f"modules at the package root: {sorted(loose)}; move each into the layer its name belongs to"


def test_no_module_imports_a_later_layer():
    upward = []
    for module, deps in graph().items():
        mine = layer(module)
        for dep in deps:
            theirs = layer(dep)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} ({LAYERS[mine]}) imports {dep} ({LAYERS[theirs]})")
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if dep == node or dep not in edges:
                continue
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "modules that import each other:\n" + "\n".join(cycles)


def test_the_import_checker_sees_upward_and_circular_imports(tmp_path, monkeypatch):
    """The checks above fail on a package that breaks the rules (they are not vacuous)."""
    pkg = tmp_path / "cliptrain"
    for name, text in {"base/__init__.py": "", "base/a.py": "from cliptrain.models import b\n",
                       "models/__init__.py": "", "models/b.py": "def f():\n    import cliptrain.models.c\n",
                       "models/c.py": "from cliptrain.models import b\n"}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    with pytest.raises(AssertionError, match=r"cliptrain.base.a \(base\) imports cliptrain.models.b \(models\)"):
        test_no_module_imports_a_later_layer()
    with pytest.raises(AssertionError, match=r"cliptrain.models.b -> cliptrain.models.c -> cliptrain.models.b"):
        test_no_import_cycles()


@pytest.mark.parametrize("old, new, name", [("cliptrain.losses", "cliptrain.objectives", "contrastive_loss"),
                                            ("cliptrain.tokenizer", "cliptrain.text", "load_clip_bpe"),
                                            ("cliptrain.training.setup", "cliptrain.training.build", "build_trainer"),
                                            ("cliptrain.models.convert", "cliptrain.checkpoint.convert",
                                             "import_pretrained")])
def test_moved_import_paths_still_work_with_a_warning(old, new, name):
    import importlib
    import sys
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moved = importlib.import_module(old)
    assert moved is importlib.import_module(new) and hasattr(moved, name)
    assert any(issubclass(w.category, DeprecationWarning) and f"{old} moved to {new}" in str(w.message) for w in caught)


def test_python_m_of_the_old_cli_path_runs_the_command_line():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-m", "cliptrain.cli", "models"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "tiny" in out.stdout, out.stderr
