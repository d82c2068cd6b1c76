"""scripts/requirements-jetson.txt and what checks it (scripts/jetson_requirements.py).

The real resolution for Python 3.10 / aarch64 needs the package index, so it is a CI step
(`scripts/test_jetson_versions.sh` runs `jetson_requirements.py check`); here, the rules it applies
and the ranges setup.py states beside the file.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("jetson_requirements", ROOT / "scripts" / "jetson_requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _floors(requirements) -> dict:
    out = {}
    for req in requirements:
        match = re.match(r"^([A-Za-z0-9_.\-]+).*?>=\s*([0-9][0-9.]*)", req)
        if match:
            out[match.group(1).lower()] = match.group(2)
    return out


def test_what_would_break_jetpack_is_named() -> None:
    problems = _script().problems
    good = {"numpy": "1.26.4", "transformers": "5.14.1", "onnx": "1.23.2"}
    assert problems(good) == []
    assert problems({**good, "torch": "2.13.0"}) == ["torch 2.13.0 would replace JetPack's"]
    assert problems({**good, "nvidia-cudnn-cu13": "9.20.0.48"}) == ["nvidia-cudnn-cu13 9.20.0.48 would replace JetPack's"]
    assert problems({**good, "opencv-python-headless": "5.1.0"}) == ["opencv-python-headless 5.1.0 would replace JetPack's"]
    assert problems({**good, "numpy": "2.2.6"}) == ["numpy 2.2.6 (Humble's compiled packages need numpy 1.x)"]
    assert problems({**good, "transformers": "5.20.2"}) == ["transformers 5.20.2 disables JetPack's torch 2.5.0a0"]
    assert problems({**good, "transformers": "5.15.0"}) == ["transformers 5.15.0 disables JetPack's torch 2.5.0a0"]


def test_the_files_state_what_jetpack_needs() -> None:
    lines = [line.split("#", 1)[0].strip() for line in (ROOT / "scripts/requirements-jetson.txt").read_text().splitlines()]
    specs = {re.match(r"[A-Za-z0-9_.\-]+", s).group(0).lower(): s for s in lines if s}
    assert not {"torch", "tensorrt", "opencv-python", "opencv-python-headless", "onnxruntime"} & set(specs)
    assert "<2" in specs["numpy"] and "<5.15" in specs["transformers"]
    oldest = _script().oldest()
    assert "numpy==1.21.6" in oldest and "transformers==5.0" in oldest and "onnx==1.17" in oldest


def test_setup_py_states_the_jetson_floors() -> None:
    """A package both files name has the same floor in each (setup.py has no numpy ceiling: desktops run numpy 2)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    setup_call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in setup_call.keywords if k.arg in ("install_requires",
                                                                                           "extras_require")}
    setup_reqs = kwargs["install_requires"] + [r for reqs in kwargs["extras_require"].values() for r in reqs]
    jetson = _floors((ROOT / "scripts/requirements-jetson.txt").read_text().splitlines())
    setup = _floors(setup_reqs)
    shared = set(jetson) & set(setup)
    assert {"numpy", "transformers", "onnx", "safetensors"} <= shared
    assert {name: setup[name] for name in shared} == {name: jetson[name] for name in shared}
    assert "torch>=2.3" in setup_reqs          # JetPack 6.0's torch; the ONNX exporter's dynamo flag is detected
    assert "requirements-jetson.txt" in (ROOT / "package.xml").read_text()
