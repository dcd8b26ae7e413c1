"""The packages import one way (docs/architecture.md): each folder is a layer and imports only the
layers below it: framework (pipeline/) <- tasks (stages/tasks/) <- stages (stages/);
framework <- trainer (trainer/); framework, tasks, trainer <- testbed (testbed/); everything
<- orchestration (tapo/: flows, CLI, views of a run). Walks every import statement
(function-level ones too), and checks that no import circle exists."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {  # folder -> its layer (the longest folder that holds a module decides)
    "pipeline": "framework",
    "stages/tasks": "tasks",
    "stages": "stages",
    "trainer": "trainer",
    "testbed": "testbed",
    "tapo": "orchestration",
}
ALLOWED = {  # layer -> the layers it may import
    "framework": {"framework"},
    "tasks": {"framework", "tasks"},
    "stages": {"framework", "tasks", "stages"},
    "trainer": {"framework", "trainer"},
    "testbed": {"framework", "tasks", "trainer", "testbed"},
    "orchestration": {"framework", "tasks", "stages", "trainer", "testbed", "orchestration"},
}


def layer(module: str) -> str | None:
    """The layer of a project module (dotted name): its folder's; None for anything else."""
    folder = module.replace(".", "/")
    for prefix in sorted(FOLDERS, key=len, reverse=True):
        if folder == prefix or folder.startswith(prefix + "/"):
            return FOLDERS[prefix]
    return None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))  # (and `from tapo import flows`:)
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                    if (ROOT / node.module.replace(".", "/") / alias.name).is_dir()
                    or (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").is_file()]
    return out


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted(p for folder in FOLDERS if "/" not in folder
                 for p in (ROOT / folder).rglob("*.py"))


def test_every_module_has_a_layer():
    assert SOURCES and all(layer(module_of(p)) for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_one_way(path):
    here = layer(module_of(path))
    wrong = [f"line {line}: {module} ({layer(module)})" for line, module in imports(path)
             if layer(module) is not None and layer(module) not in ALLOWED[here]]
    assert not wrong, f"{path.relative_to(ROOT)} ({here}) imports against the layers: {wrong}"


def test_the_walker_sees_function_level_imports(tmp_path):
    """The check itself can fail: a late import inside a function is found."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from stages.select import Select\n    import trainer.rl\n")
    assert [m for _, m in imports(source)] == ["stages.select", "trainer.rl"]


def test_no_task_branch_outside_the_tasks():
    """Task differences live in the task plugins: no `task == "arith"` (or `.name == "math"`)
    anywhere else."""
    import re

    branch = re.compile(r"""(task|name)\s*[!=]=\s*["'](arith|math)["']""")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if "tasks" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if branch.search(line)]
    assert not hits, hits


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (the longest known prefix of each
    imported name: `from trainer.sft import x` -> trainer.sft)."""
    modules = {module_of(p): p for p in SOURCES}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    return {m: {k for _, name in imports(p) if (k := known(name)) and k != m}
            for m, p in modules.items()}


def a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (its modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    """No module imports, directly or through others, one that imports it (function-level
    imports included): the runner and its executors, the trainers and their dispatcher."""
    assert a_cycle(import_graph()) is None, " -> ".join(a_cycle(import_graph()))


def test_the_circle_finder_finds_one():
    assert a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert a_cycle({"a": {"b"}, "b": set()}) is None
