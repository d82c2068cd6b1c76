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
