"""The package's module graph: no module imports another that imports it back (an import inside a function
counts too: it hides the circle from Python, not from a reader), and the cache reads without the selection
or conversion code."""
import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lt_train")


def _graph() -> dict[str, set[str]]:
    mods: dict[str, set[str]] = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
            name = rel.removesuffix(".__init__")
            package = name if f == "__init__.py" else name.rsplit(".", 1)[0]
            deps = set()
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    if node.module:
                        deps.add(f"{base}.{node.module}")
                    else:  # from . import x: the submodules x
                        deps.update(f"{base}.{a.name}" for a in node.names)
            mods[name] = deps
    return {m: {d for d in deps if d in mods and d != m} for m, deps in mods.items()}


def _reaches(graph, start) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_no_module_imports_one_that_imports_it_back():
    graph = _graph()
    assert "lt_train.cache" in graph and "lt_train.hybrid" in graph
    cycles = sorted(m for m in graph if not m.endswith("__init__") and m in _reaches(graph, m)
                    and m != "lt_train")
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_the_cache_reads_without_selection_or_conversion_code():
    reach = _reaches(_graph(), "lt_train.cache")
    assert not reach & {"lt_train.lazy", "lt_train.hybrid", "lt_train.online"}, reach
