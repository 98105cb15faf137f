"""data_pipelines' modules import each other without cycles, function-level imports included."""

import ast
from pathlib import Path

import data_pipelines

PACKAGE = Path(data_pipelines.__file__).parent


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The data_pipelines modules that `path` imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name.split(".", 2)[1] for name in names
                  if name.startswith("data_pipelines.") and name.split(".", 2)[1] in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    return {name: imported_modules(PACKAGE / f"{name}.py", modules) - {name} for name in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, stack = set(), []

    def visit(name):
        if name in stack:
            return stack[stack.index(name):] + [name]
        if name in done:
            return None
        stack.append(name)
        for target in sorted(graph[name]):
            cycle = visit(target)
            if cycle:
                return cycle
        stack.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name)
        if cycle:
            return cycle
    return None


def test_the_import_graph_sees_function_level_imports():
    graph = import_graph()
    assert {"convert", "verify", "cli_common"} <= graph["commands"]
    assert "loader" in graph["bench"]  # imported inside loader_samples_per_s
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_data_pipelines_modules_import_each_other_without_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_errors_and_cli_common_import_no_command_module():
    graph = import_graph()
    assert graph["errors"] == set()
    commands = {"commands", "convert", "verify", "bench"}
    reachable, todo = set(), ["cli_common"]
    while todo:
        for target in graph[todo.pop()] - reachable:
            reachable.add(target)
            todo.append(target)
    assert not reachable & commands, reachable
