"""Imports run one way: ROS and the CLIs on the core, the core never on them, backends on their shared base only."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kosmos2_ros"
BACKENDS = PACKAGE / "core" / "backends"
#: What a backend folder may import from the package besides itself.
BACKEND_SHARED = {"kosmos2_ros.core.defaults", "kosmos2_ros.core.backends.base", "kosmos2_ros.core.backends.graph",
                  "kosmos2_ros.core.backends.kv_cache", "kosmos2_ros.core.backends.modules",
                  "kosmos2_ros.core.backends.device_graph", "kosmos2_ros.core.backends.logits",
                  "kosmos2_ros.core.backends.errors"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, absolute module) of every package import in the file, relative ones resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("kosmos2_ros"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [f"{mod}.{a.name}" for a in node.names] if not node.module else [mod]
                yield from ((node.lineno, n) for n in names)
            elif node.module and node.module.startswith("kosmos2_ros"):
                yield node.lineno, node.module


def test_the_core_imports_nothing_above_it():
    wrong = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in sorted((PACKAGE / "core").rglob("*.py"))
             for line, mod in imports(p) if not mod.startswith("kosmos2_ros.core")]
    assert not wrong, "\n".join(wrong)


def test_backend_folders_use_only_the_shared_backend_modules():
    wrong = []
    for folder in sorted(d for d in BACKENDS.iterdir() if d.is_dir() and d.name != "__pycache__"):
        own = module_name(folder)
        allowed = BACKEND_SHARED | ({"kosmos2_ros.core.backends.onnx"} if folder.name == "tensorrt" else set())
        for p in sorted(folder.rglob("*.py")):
            for line, mod in imports(p):
                if not (mod.startswith(own) or any(mod == a or mod.startswith(a + ".") for a in allowed)):
                    wrong.append(f"{p.relative_to(ROOT)}:{line} imports {mod}")
    assert not wrong, "\n".join(wrong)
    assert {d.name for d in BACKENDS.iterdir() if d.is_dir() and d.name != "__pycache__"} == {"torch", "onnx", "tensorrt"}


def test_shared_backend_modules_import_no_backend_folder_and_nothing_above():
    wrong = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in sorted(BACKENDS.glob("*.py"))
             for line, mod in imports(p)
             if not (mod in BACKEND_SHARED or mod.startswith("kosmos2_ros.core.backends.registry")
                     or mod == "kosmos2_ros.core.backends.registry")]
    assert not wrong, "\n".join(wrong)


def _module_file(mod: str) -> Path:
    base = ROOT / mod.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return Path()


def import_graph() -> dict:
    """Every package module -> the package modules it imports anywhere in it (function-level imports too;
    `from pkg import name` counts as pkg.name where that is a module, else as pkg)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        targets = set()
        for _, mod in imports(path):
            while mod and not _module_file(mod).name:
                mod = mod.rsplit(".", 1)[0] if "." in mod else ""
            if mod:
                targets.add(mod)
        graph[module_name(path)] = targets - {module_name(path)}
    return graph


def test_no_import_circles():
    """No module imports, however indirectly, one that imports it back (a shared piece goes to the module
    both depend on). Packages' `__init__` modules are not edges: importing a submodule runs them anyway."""
    graph = {m: {t for t in ts if not _module_file(t).name == "__init__.py"} for m, ts in import_graph().items()}
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:   # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_node_never_imports_a_fixture():
    """Nothing the node can import (function-level imports included) is a fixture module: tiny checkpoints
    and made-up scenes are for tests, the demo, benchmarks and eval."""
    graph, seen, todo = import_graph(), set(), ["kosmos2_ros.ros.node"]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(graph.get(mod, ()))
    assert "kosmos2_ros.core.serving.pipeline" in seen
    assert not sorted(m for m in seen if m.startswith("kosmos2_ros.fixtures")), sorted(seen)
