"""The import graph of `model/` and `batchgen/`: no loops between modules or between folders, no upward imports,
and the light entry points (spec checking, `validate`, `presets`) import neither Keras nor JAX.

Every import counts, whether at the top of a file, inside a function or under `TYPE_CHECKING`: a loop hidden in
a function is still a loop a reader has to hold.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("model", "batchgen")


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of model/ or batchgen/: line}."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [known(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    prefix = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(prefix + ([node.module] if node.module else []))
                targets = [known(f"{base}.{alias.name}") or known(base) for alias in node.names]
            for target in targets:
                if target and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def _loops(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, {}):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return loops


def _describe(graph: dict[str, dict[str, int]], loop: list[str]) -> str:
    edges = [f"{a} -> {b} (line {line})" for a in loop for b, line in graph.get(a, {}).items() if b in loop]
    return "; ".join(edges)


def _folder(module: str) -> str:
    """The unit a module belongs to at the folder level: a top-level module, or its first-level subpackage."""
    return ".".join(module.split(".")[:2])


def test_no_import_loop_between_modules():
    graph = _import_graph()
    loops = _loops(graph)
    assert not loops, "import loops: " + " | ".join(_describe(graph, loop) for loop in loops)


def test_no_upward_import_between_folders():
    # Collapsed to folders (model.generation, model.samplers, model.parallel, ...), the graph must still be a
    # DAG: a module in a lower folder importing from a folder above it (as parallel.py once imported the KV
    # cache from generation/, which imports parallel.py) is a loop here even where modules do not loop.
    graph = _import_graph()
    folders: dict[str, dict[str, int]] = {}
    for module, edges in graph.items():
        if module in PACKAGES:
            continue  # a package's own __init__ may re-export anything below it
        for target, line in edges.items():
            if _folder(target) != _folder(module):
                folders.setdefault(_folder(module), {}).setdefault(_folder(target), line)
    loops = _loops(folders)
    assert not loops, "loops between folders: " + " | ".join(_describe(folders, loop) for loop in loops)


def test_model_never_imports_batchgen_and_nothing_imports_a_package_root_from_inside():
    graph = _import_graph()
    bad = [
        f"{module} -> {target}"
        for module, edges in graph.items()
        for target in edges
        if (module.startswith("model") and target.startswith("batchgen"))
        or (target in PACKAGES and module.split(".")[0] == target)
    ]
    assert not bad, bad


@pytest.mark.parametrize(
    "code",
    [
        "import batchgen.spec, batchgen.job, batchgen.cli",
        "import model, model.generation.requests",
        "import model.checkpoints.presets, model.checkpoints.availability",
    ],
)
def test_light_entry_points_import_neither_keras_nor_jax(code):
    check = f"import sys; {code}; print(sorted(m for m in ('keras', 'jax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_validate_imports_neither_keras_nor_jax():
    # The check, as a user runs it: `python -X importtime -m batchgen.cli validate jobs/demo.toml`.
    command = [sys.executable, "-X", "importtime", "-m", "batchgen.cli", "validate", "jobs/demo.toml"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in imported if m.split(".")[0] in ("keras", "jax", "jaxlib"))
    assert not heavy, heavy


def test_the_readme_names_every_module_in_how_it_works():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## How it works") :]
    block = section[section.index("```") + 3 :]
    block = block[: block.index("```")]
    listed_folders = ("batchgen/bench/", "batchgen/data/")  # named as folders: the benchmark, the bundled data
    missing = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "__init__.py"
        and not str(path.relative_to(ROOT)).startswith(listed_folders)
        and path.name not in block
    ]
    assert not missing, f"README 'How it works' does not name: {missing}"


def test_the_readme_has_a_glossary():
    readme = (ROOT / "README.md").read_text()
    glossary = readme[readme.index("## Glossary") :]
    glossary = glossary[: glossary.index("\n## ", 1)]
    for word in ("rows_ok", "status", "max_slots", "RUN_ONLY_KEYS", "seeds.py"):
        assert word in glossary, word
