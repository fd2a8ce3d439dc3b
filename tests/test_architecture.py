"""The layers: apps -> strategies -> core, the core free of Flower, and no import circle between
the project's modules, not even one that only type checking would follow."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pmafl", "strategies", "client_app", "server_app")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (functions and `if TYPE_CHECKING:`
    included): for `from a.b import c`, both `a.b` and `a.b.c` (c may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name: {m for m in imports(path) if m in files and m != name} for name, path in files.items()}


def test_the_core_imports_no_flower_and_strategies_no_app():
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    for path in files:
        name, found = module_name(path), imports(path)
        top = {m.split(".")[0] for m in found}
        if name.startswith("pmafl"):
            assert not top & {"flwr", "strategies", "client_app", "server_app"}, name
        if name.startswith("strategies"):
            assert not top & {"client_app", "server_app"}, name


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` (a list of modules, the first repeated at the end), or None. A package's
    `__init__` importing its own submodules is no cycle: importing a submodule runs the package's
    `__init__` first, but the edge from a submodule to its package goes through it only when the
    submodule imports the package itself."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_between_the_projects_modules():
    graph = project_graph()
    # The edge a.b -> a (a package's __init__ re-exporting its parts) is followed like any other:
    # a module that imports its own package's __init__, which imports it back, is a circle too.
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_type_only_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
