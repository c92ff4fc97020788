"""The package's architecture, checked from its source: no import cycles, and no layer importing upward.

Every module under src/gptforge is parsed (not imported). An import counts wherever it is written: at the
top of a module or inside a function, since an import deferred into a function is still a dependency.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "gptforge"

# The layer rules, one row per layer: nothing in the package on the left may import, directly or through
# other modules, from any package of gptforge on the right.
LAYERS = {
    "gptforge.model": ("train", "parallel", "observe", "adapt", "bench", "evaluate", "data", "config", "tune", "cli"),
    "gptforge.data": ("train", "parallel", "observe", "adapt", "bench", "evaluate", "model"),
}

Graph = dict[str, dict[str, str]]  # module -> {module it imports: where, "gptforge/x.py:line"}


def module_names(src: Path) -> dict[str, Path]:
    """Dotted name of every module under src/gptforge, packages by their __init__.py."""
    names = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _known(name: str, modules) -> str | None:
    """The longest prefix of a dotted name that is one of the modules (`gptforge.x.f` -> `gptforge.x`)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def imports_of(name: str, path: Path, modules, src: Path = SRC) -> dict[str, str]:
    """The modules of the package that one module imports, each with where the import is written."""
    is_package = path.name == "__init__.py"
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, one level up per extra dot
                package = name.split(".") if is_package else name.split(".")[:-1]
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from gptforge.x import y` imports the submodule gptforge.x.y when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        for target in targets:
            module = _known(target, modules)
            if module is not None:
                found.setdefault(module, f"{path.relative_to(src).as_posix()}:{node.lineno}")
    return found


def import_graph(src: Path = SRC) -> Graph:
    modules = module_names(src)
    return {name: imports_of(name, path, modules, src) for name, path in modules.items()}


def _chain(graph: Graph, path: list[str]) -> str:
    """`a -> b -> c`, each arrow followed by where that import is written."""
    steps = [path[0]] + [f"-> {b}  ({graph[a][b]})" for a, b in zip(path, path[1:])]
    return "\n    ".join(steps)


def _shortest_path(graph: Graph, start: str, reached, allowed=None) -> list[str] | None:
    """Shortest import path from start to the first module for which reached(module) holds (start itself
    excluded), through the allowed modules only when given."""
    parent = {start: None}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for target in sorted(graph.get(module, {})):
            if reached(target):
                path = [target, module]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1]
            if target not in parent and (allowed is None or target in allowed):
                parent[target] = module
                queue.append(target)
    return None


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted, in order of their first member."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph.get(module, {}):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(components)


def _from_first(loop: list[str]) -> tuple[str, ...]:
    """A loop `b -> c -> a -> b` told from its alphabetically first module: `a -> b -> c -> a`."""
    ring = loop[:-1]
    start = ring.index(min(ring))
    ring = ring[start:] + ring[:start]
    return (*ring, ring[0])


def import_cycles(graph: Graph) -> list[str]:
    """One entry per cycle: the modules that import each other, and a shortest loop through each of them."""
    problems = []
    for component in strongly_connected(graph):
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        members = set(component)
        loops = {_from_first(_shortest_path(graph, m, lambda t, m=m: t == m, members)) for m in component}
        shown = sorted(loops, key=lambda loop: (len(loop), loop))
        problems.append(f"import cycle among {', '.join(component)}:\n    "
                        + "\n  and\n    ".join(_chain(graph, list(loop)) for loop in shown))
    return problems


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def upward_imports(graph: Graph, layers=LAYERS, root: str = PACKAGE) -> list[str]:
    """One entry per module of a layer that reaches a package the layer must not import from, with the path."""
    problems = []
    for layer, forbidden in layers.items():
        above = [f"{root}.{name}" for name in forbidden]
        for module in sorted(m for m in graph if _inside(m, layer)):
            path = _shortest_path(graph, module, lambda t: any(_inside(t, p) for p in above))
            if path is not None:
                problems.append(f"{module} reaches {path[-1]}, which {layer} must not import:\n"
                                f"    {_chain(graph, path)}")
    return problems


# --- the package itself ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph()


def test_the_graph_sees_the_package(graph):
    assert {"gptforge", "gptforge.cli", "gptforge.model.gpt", "gptforge.data.tokenizer"} <= set(graph)
    assert "gptforge.model.gpt" in graph["gptforge.model.flops"]  # a module-level import
    assert "gptforge.train.loop" in graph["gptforge.cli"]  # an import inside a function


def test_no_import_cycles(graph):
    problems = import_cycles(graph)
    assert not problems, "\n\n".join(problems)


def test_no_layer_imports_upward(graph):
    problems = upward_imports(graph)
    assert not problems, "\n\n".join(problems)


# --- the finder, on a package made up for it ------------------------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "gptforge" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_imports_are_resolved_in_every_form(tmp_path):
    src = write_package(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "data/__init__.py": "from . import tokenizer\n",
        "data/tokenizer.py": "",
        "data/loader.py": "from .tokenizer import Tokenizer\nfrom ..errors import DataError\n",
        "train/__init__.py": "",
        "train/loop.py": "import gptforge.data.loader\n\ndef f():\n    from gptforge.data import tokenizer\n",
        "train/rng.py": "from gptforge.train.loop import seed\nimport torch\n",
    })

    graph = import_graph(src)

    assert set(graph["gptforge.data"]) == {"gptforge.data.tokenizer"}
    assert set(graph["gptforge.data.loader"]) == {"gptforge.data.tokenizer", "gptforge.errors"}
    assert set(graph["gptforge.train.loop"]) == {"gptforge.data.loader", "gptforge.data.tokenizer"}
    assert set(graph["gptforge.train.rng"]) == {"gptforge.train.loop"}
    assert graph["gptforge.train.loop"]["gptforge.data.tokenizer"] == "gptforge/train/loop.py:4"


def test_the_finder_reports_a_cycle_and_an_upward_import(tmp_path):
    src = write_package(tmp_path, {
        "__init__.py": "",
        "model/__init__.py": "",
        "model/gpt.py": "from gptforge.model.flops import count\n",
        "model/flops.py": "def count():\n    from gptforge.train.loop import train\n",
        "train/__init__.py": "",
        "train/loop.py": "from gptforge.model.gpt import GPT\n",
        "train/rng.py": "from gptforge.train import rng\n",
    })
    graph = import_graph(src)

    cycles = import_cycles(graph)
    upward = upward_imports(graph, {"gptforge.model": ("train",)})

    assert len(cycles) == 2
    assert cycles[0].startswith("import cycle among gptforge.model.flops, gptforge.model.gpt, gptforge.train.loop")
    assert cycles[0].endswith("gptforge.model.flops\n"
                              "    -> gptforge.train.loop  (gptforge/model/flops.py:2)\n"
                              "    -> gptforge.model.gpt  (gptforge/train/loop.py:1)\n"
                              "    -> gptforge.model.flops  (gptforge/model/gpt.py:1)")
    assert cycles[1].startswith("import cycle among gptforge.train.rng:")  # a module importing itself
    assert [problem.split("\n")[0] for problem in upward] == [
        "gptforge.model.flops reaches gptforge.train.loop, which gptforge.model must not import:",
        "gptforge.model.gpt reaches gptforge.train.loop, which gptforge.model must not import:"]
    assert "-> gptforge.train.loop  (gptforge/model/flops.py:2)" in upward[0]
    assert upward_imports(graph) == upward  # the package's own table forbids it too


def test_a_package_without_cycles_or_upward_imports_passes(tmp_path):
    src = write_package(tmp_path, {
        "__init__.py": "",
        "model/__init__.py": "",
        "model/gpt.py": "",
        "train/__init__.py": "",
        "train/loop.py": "from gptforge.model.gpt import GPT\n",
    })
    graph = import_graph(src)

    assert import_cycles(graph) == []
    assert upward_imports(graph, {"gptforge.model": ("train",)}) == []
