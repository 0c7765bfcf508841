"""The package's shape: data flows one way, so no module, and no subpackage, imports one that imports it back."""

import ast
from pathlib import Path

import layercrit

ROOT = Path(layercrit.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside functions, or by name through importlib
    (every string naming a module, absolute or relative to the package, in a module that calls import_module)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        if "import_module(" in path.read_text():
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    named = {node.value, f"{ROOT.name}.{node.value.lstrip('.')}"} & set(modules) - {ROOT.name}
                    graph[name].update(named)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])]) if node.level else node.module
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    graph[name].add(candidate if candidate in modules else target)
            elif isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names)
        graph[name] = {t for t in graph[name] if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "layercrit.zoo" in graph["layercrit.resolve"]
    assert cycles(graph) == []


def subpackage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Subpackage (or top-level module) -> those its modules import, the package's front door left out (it names
    every public function, importing none until used)."""
    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])

    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module == ROOT.name:
            continue
        units.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    return {u: {t for t in targets if t in units} for u, targets in units.items()}


def test_the_import_graph_counts_imports_inside_functions_and_by_name():
    graph = import_graph()
    assert "layercrit.sweeps.store" in graph["layercrit.results"]  # inside read_table
    assert "layercrit.zoo.fmnist" in graph["layercrit.zoo"]  # importlib.import_module("layercrit.zoo.fmnist")
    assert "layercrit.measurement.measure" in graph["layercrit"]  # the front door's names, relative


def test_no_subpackage_imports_one_that_imports_it_back():
    graph = subpackage_graph(import_graph())
    assert "layercrit.zoo" in graph["layercrit.resolve"] and "layercrit.models" in graph["layercrit.zoo"]
    assert cycles(graph) == []


def test_value_types_resolve_nothing():
    graph = import_graph()
    assert graph["layercrit.models.base"] == set()
    assert graph["layercrit.data.evalset"] <= {"layercrit.errors", "layercrit.models.base"}
    assert graph["layercrit.spec"] <= {"layercrit.errors"}
    assert graph["layercrit.columns"] == set()
    assert graph["layercrit.measurement.tasks"] <= {"layercrit.errors", "layercrit.models.base",
                                                    "layercrit.data.evalset"}
