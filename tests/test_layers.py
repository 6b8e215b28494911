"""The package is layered: every import of a launcher module goes down a layer, never up.

The graph is built from the AST of every module, counting imports inside functions, so an import
placed in a function body to dodge a cycle is caught like any other.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "launcher"

# Top to bottom. A module may import launcher modules from strictly lower layers only. A package
# name (recipe, batch) stands for all of its submodules, which may import each other acyclically.
LAYERS: list[tuple[str, ...]] = [
    ("dev.quickstart", "dev.chat_demo"),
    ("cli",),
    ("targets.local", "targets.ray_jobs", "targets.kuberay"),
    ("targets.preflight", "targets.envcheck"),
    ("targets",),
    ("job",),
    # Stages. The batch stage scores the recipe's evaluation split read and tokenized exactly as
    # the data stage does, so it sits above data.
    ("train", "export", "batch", "summary", "prepared", "dev.smoke", "dev.reference"),
    # Large sources prepared by Ray Data tasks, with the data stage's validation and tokenizing.
    ("stream_data",),
    ("data",),
    ("train_loop",),
    ("distill", "export_layout"),
    ("finetune", "strategies", "objectives", "tracking", "checkpointing", "channel"),
    ("sharded_load",),
    ("models", "adapters", "tokenize", "elastic_data"),
    ("collate", "chat", "source_files"),
    ("raysession", "rundir", "progress", "dev.tiny", "hf_files"),
    ("recipe", "records", "internals", "dev.synthetic"),
    ("metrics", "deepspeed_config"),
    ("errors", "dev", ""),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names, relative to launcher (\"\" is the package)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if importer else []
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, node.module] if node.module else base)


def launcher_imports(path: Path) -> set[str]:
    """Every launcher module the file imports, anywhere in it, without the `launcher.` prefix."""
    importer = module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(importer, path.name == "__init__.py", node)
            if node.level == 0 and not (target == "launcher" or target.startswith("launcher.")):
                continue
            target = target if node.level else target.removeprefix("launcher").lstrip(".")
            # `from launcher import batch` imports the module launcher.batch.
            names = [f"{target}.{a.name}".lstrip(".") for a in node.names]
            names = [n if module_exists(n) else target for n in names]
            found.update(names)
            continue
        else:
            continue
        found.update(
            n.removeprefix("launcher").lstrip(".")
            for n in names
            if n == "launcher" or n.startswith("launcher.")
        )
    found.discard(importer)
    return found


def module_exists(name: str) -> bool:
    rel = Path(*name.split(".")) if name else Path()
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def graph() -> dict[str, set[str]]:
    return {module_name(p): launcher_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer of the most specific entry naming the module or a package above it."""
    best: tuple[int, int] | None = None
    for index, names in enumerate(LAYERS):
        for name in names:
            if module == name or (name and module.startswith(name + ".")) or name == "":
                depth = len(name.split(".")) if name else 0
                if best is None or depth > best[0]:
                    best = (depth, index)
    if best is None:
        raise AssertionError(f"launcher.{module} is in no layer: add it to LAYERS")
    return best[1]


def same_package(a: str, b: str) -> bool:
    return a.split(".")[0] == b.split(".")[0] and "." in (a + b) and a.split(".")[0] != "dev"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if state.get(nxt) is None and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if state.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_layer():
    for module in graph():
        layer_of(module)


def test_imports_only_go_down_a_layer():
    wrong = []
    for module, imports in graph().items():
        for target in imports:
            if same_package(module, target):
                continue  # submodules of one package; cycles are checked below
            if layer_of(target) <= layer_of(module):
                wrong.append(f"launcher.{module} imports launcher.{target}")
    assert not wrong, "imports that do not go down a layer:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import launcher.data\n", {"data"}),
        ("def f():\n    from launcher.batch import jobs\n", {"batch.jobs"}),
        ("from launcher import metrics as M\n", {"metrics"}),
        ("from launcher.batch.jobs import evaluate\n", {"batch.jobs"}),
        ("from . import data\n", {"data"}),
    ],
)
def test_the_graph_sees_every_form_of_import(tmp_path, monkeypatch, source, expected):
    package = tmp_path / "launcher"
    (package / "batch").mkdir(parents=True)
    for name in ("__init__.py", "data.py", "metrics.py", "batch/__init__.py", "batch/jobs.py"):
        (package / name).write_text("")
    (package / "summary.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert launcher_imports(package / "summary.py") == expected


def test_an_upward_import_is_caught():
    assert layer_of("cli") < layer_of("job") < layer_of("data") < layer_of("recipe")
    assert layer_of("batch.jobs") == layer_of("batch")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_700_lines():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 700
    }
    assert not long, f"split these modules: {long}"


def test_the_readme_module_table_matches_the_tree():
    readme = (PACKAGE.parent / "README.md").read_text()
    listed = set(re.findall(r"\| `(launcher/[\w/]+(?:\.py|/))` \|", readme))
    tree = {
        str(p.relative_to(PACKAGE.parent)) + ("/" if p.is_dir() else "")
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").exists()
    }
    assert listed == tree, (
        f"README module table: missing {sorted(tree - listed)}, not in the tree "
        f"{sorted(listed - tree)}"
    )
