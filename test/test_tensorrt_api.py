"""Static guard: the package's TensorRT code uses only API that TensorRT 10.3 (JetPack 6) and
TensorRT 11.x (desktop pip) both have. Runs without TensorRT (it reads the code's AST).

The facts are data with their sources in `test/data/tensorrt_api.json`: what NVIDIA's
10.x -> 11.x migration guide lists as removed, and what the Python bindings register at
TensorRT 10.3.0 and at 11.1 (removed since 10.3, added since 10.3). The guard finds:

- chains rooted at the tensorrt module (`trt.BuilderFlag.FP16`, `getattr(trt.X, "Y")`, the
  module under any alias: `import tensorrt as t`, `t = require_tensorrt()`, `self._trt`):
  each must be neither removed in 11 nor missing from 10.3, and must be on the list of names
  checked in both (a new use has to be checked and added there);
- members used on any object in those files (`config.int8_calibrator`,
  `builder.platform_has_fast_fp16`, `engine.create_runtime_config()`): a member name with an
  underscore that TensorRT 11 removed or 10.3 lacks is refused. Names without an underscore
  ("precision", "update") are too common to judge without types; they are judged only in
  module-rooted chains.
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = json.loads((Path(__file__).parent / "data" / "tensorrt_api.json").read_text())
REMOVED_IN_11: Dict[str, str] = API["removed_in_11"]
VERIFIED: Set[str] = set(API["verified_in_10_3_and_11"])
GONE_SINCE_10_3: Set[str] = set(API["removed_after_10_3"])
NEW_SINCE_10_3: Set[str] = set(API["added_after_10_3"])
REMOVED_MEMBERS: Dict[str, str] = {k.split(".")[-1]: f"{k}: {v}" for k, v in REMOVED_IN_11.items()
                                   if k.split(".")[-1][:1].islower()}


@dataclass(frozen=True)
class Finding:
    line: int
    name: str
    why: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.name}: {self.why}"


def _chain(node: ast.AST, aliases: Set[str]) -> Optional[List[str]]:
    """["BuilderFlag", "FP16"] for trt.BuilderFlag.FP16 (any alias of the module), else None."""
    parts: List[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    parts.reverse()
    if parts[:2] == ["self", "_trt"]:
        return parts[2:]
    return parts[1:] if parts[0] in aliases else None


def _aliases(tree: ast.AST) -> Set[str]:
    """Names bound to the tensorrt module: imports and `x = require_tensorrt()` / `engines.require_tensorrt()`."""
    names: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name == "tensorrt"}
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called == "require_tensorrt":
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _judge_chain(parts: List[str]) -> Optional[str]:
    name = ".".join(parts)
    if name in REMOVED_IN_11:
        return f"removed in TensorRT 11 (use: {REMOVED_IN_11[name]})"
    if any(p in GONE_SINCE_10_3 for p in parts):
        return "registered by TensorRT 10.3's bindings but not by 11's (removed in TensorRT 11)"
    if any(p in NEW_SINCE_10_3 for p in parts):
        return "not in TensorRT 10.3 (JetPack 6): added later"
    if name not in VERIFIED:
        return ("not checked against TensorRT 10.3 and 11: check it in both bindings and add it to "
                "test/data/tensorrt_api.json verified_in_10_3_and_11")
    return None


def _judge_member(name: str) -> Optional[str]:
    if "_" not in name.strip("_"):
        return None
    if name in REMOVED_MEMBERS:
        return f"removed in TensorRT 11 ({REMOVED_MEMBERS[name]})"
    if name in GONE_SINCE_10_3:
        return "registered by TensorRT 10.3's bindings but not by 11's (removed in TensorRT 11)"
    if name in NEW_SINCE_10_3:
        return "not in TensorRT 10.3 (JetPack 6): added later"
    return None


def uses_tensorrt(source: str) -> bool:
    tree = ast.parse(source)
    return bool(_aliases(tree)) or any(_chain(n, set()) is not None for n in ast.walk(tree)
                                       if isinstance(n, ast.Attribute))


def check_tensorrt_api(source: str) -> List[Finding]:
    """Every use of TensorRT API in `source` that TensorRT 11 removed or TensorRT 10.3 lacks."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id in ("getattr", "hasattr") and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant)
             and isinstance(n.args[1].value, str)]
    # judged once, as the whole chain: obj.a.b's inner obj.a, getattr(trt.X, "Y")'s trt.X
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {id(c.args[0]) for c in calls}
    findings: List[Finding] = []

    def judge(node: ast.AST, parts: Optional[List[str]], member: str) -> None:
        why = _judge_chain(parts) if parts is not None else _judge_member(member)
        if why:
            findings.append(Finding(node.lineno, ".".join(["trt", *parts]) if parts is not None else member, why))

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            parts = _chain(node, aliases)
            judge(node, parts if parts else None, node.attr)
            if parts is None:   # members inside a chain on an object: obj.a.b -> a too
                value = node.value
                while isinstance(value, ast.Attribute):
                    judge(value, None, value.attr)
                    value = value.value
    for node in calls:
        base = _chain(node.args[0], aliases)
        judge(node, None if base is None else [*base, node.args[1].value], node.args[1].value)
    return findings


def module_chains(source: str) -> Set[str]:
    """The module-rooted names `source` uses ("Logger.WARNING", ...), getattr's included."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    seen = {".".join(c) for n in ast.walk(tree) if isinstance(n, ast.Attribute) for c in [_chain(n, aliases)] if c}
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "getattr" and len(n.args) >= 2:
            base = _chain(n.args[0], aliases)
            if base is not None and isinstance(n.args[1], ast.Constant):
                seen.add(".".join([*base, str(n.args[1].value)]))
    return seen


def package_files() -> Iterable[Path]:
    for folder in ("kosmos2_ros", "bench"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def tensorrt_files() -> List[Path]:
    return [f for f in package_files() if uses_tensorrt(f.read_text())]


# -- the guard over the package ------------------------------------------------------------------
def test_package_tensorrt_code_runs_on_10_3_and_11():
    files = tensorrt_files()
    names = {f.relative_to(ROOT).as_posix() for f in files}
    assert {"kosmos2_ros/core/backends/tensorrt/engines.py", "kosmos2_ros/core/backends/tensorrt/backend.py"} <= names, names
    problems = [f"{f.relative_to(ROOT)} {finding}" for f in files for finding in check_tensorrt_api(f.read_text())]
    assert not problems, "\n".join(problems)
    seen = set().union(*(module_chains(f.read_text()) for f in files))
    # not vacuous: the build path's own names are seen (and all of them are verified in both)
    assert {"NetworkDefinitionCreationFlag.STRONGLY_TYPED", "Builder", "Runtime"} <= seen <= VERIFIED, seen


def test_engine_dtypes_bound_exist_in_both():
    from kosmos2_ros.core.backends.tensorrt import engines

    for name in engines.TRT_TO_TORCH:
        assert f"DataType.{name}" in VERIFIED, name


def test_the_data_agrees_with_itself():
    """What NVIDIA's guide lists as removed is not also on the verified list, and the verified
    names are registered by both bindings (not on either difference list)."""
    assert not VERIFIED & set(REMOVED_IN_11)
    for name in VERIFIED:
        assert not set(name.split(".")) & (GONE_SINCE_10_3 | NEW_SINCE_10_3), name
    for flag in ("FP16", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"):   # facts.md, both sources
        assert f"BuilderFlag.{flag}" in REMOVED_IN_11 and flag in GONE_SINCE_10_3


# -- the guard proves it works -----------------------------------------------------------------
CAUGHT = {
    "config.set_flag(trt.BuilderFlag.FP16)": ("trt.BuilderFlag.FP16", "removed in TensorRT 11"),
    "config.set_flag(trt.BuilderFlag.BF16)": ("trt.BuilderFlag.BF16", "removed in TensorRT 11"),
    "config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)": ("trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS",
                                                                    "removed in TensorRT 11"),
    "flag = getattr(trt.BuilderFlag, 'INT8')": ("trt.BuilderFlag.INT8", "removed in TensorRT 11"),
    "fast = builder.platform_has_fast_fp16": ("platform_has_fast_fp16", "removed in TensorRT 11"),
    "config.int8_calibrator = calib": ("int8_calibrator", "removed in TensorRT 11"),
    "n = engine.device_memory_size": ("device_memory_size", "removed in TensorRT 11"),
    "net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))":
        ("trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH", "removed in TensorRT 11"),
    "cfg = engine.create_runtime_config()": ("create_runtime_config", "not in TensorRT 10.3"),
    "level = trt.TilingOptimizationLevel.FAST": ("trt.TilingOptimizationLevel.FAST", "not in TensorRT 10.3"),
    "config.tiling_optimization_level = 2": ("tiling_optimization_level", "not in TensorRT 10.3"),
    "x = trt.SomethingNew": ("trt.SomethingNew", "not checked against TensorRT 10.3 and 11"),
}


@pytest.mark.parametrize("line", sorted(CAUGHT))
def test_guard_catches(line):
    name, why = CAUGHT[line]
    for header in ("import tensorrt as trt\n", "from x import engines\ntrt = engines.require_tensorrt()\n"):
        findings = check_tensorrt_api(header + line + "\n")
        assert [(f.name, f.line) for f in findings] == [(name, 3 if "engines" in header else 2)], findings
        assert why in findings[0].why


def test_guard_follows_aliases_and_self():
    src = ("import tensorrt as t\nclass B:\n    def f(self):\n        self._trt.BuilderFlag.FP16\n"
           "        t.BuilderFlag.BF16\n")
    assert [f.name for f in check_tensorrt_api(src)] == ["trt.BuilderFlag.FP16", "trt.BuilderFlag.BF16"]


def test_guard_passes_the_strongly_typed_build():
    src = """
import tensorrt as trt
logger = trt.Logger(trt.Logger.WARNING)
builder = trt.Builder(logger)
flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
network = builder.create_network(0 if flag is None else 1 << int(flag))
config = builder.create_builder_config()
config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
engine = trt.Runtime(logger).deserialize_cuda_engine(b"")
ctx = engine.create_execution_context()
ctx.set_input_shape("x", (1, 2))
ctx.execute_async_v3(0)
"""
    assert check_tensorrt_api(src) == []
