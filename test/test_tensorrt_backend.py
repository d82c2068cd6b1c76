"""TensorRT backend without TensorRT: clear errors naming what is missing; engine cache keys."""
from __future__ import annotations

import sys
import types

import pytest

from kosmos2_ros.core import engines, export
from kosmos2_ros.core.backends import create_backend
from kosmos2_ros.core.backends.base import BackendUnavailable
from kosmos2_ros.engine_cli import build_engines_main


def test_missing_tensorrt_is_named(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # import tensorrt -> ImportError, as here
    with pytest.raises(BackendUnavailable, match=r"tensorrt Python package not importable .*pip install tensorrt"):
        create_backend("tensorrt", str(tiny_model_dir), device="cuda", artifacts_dir=str(tmp_path))


def test_old_tensorrt_and_missing_cuda_are_named(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(BackendUnavailable, match="TensorRT 8.6.1 found; .* needs TensorRT >= 10"):
        create_backend("tensorrt", str(tiny_model_dir), artifacts_dir=str(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        create_backend("tensorrt", str(tiny_model_dir), artifacts_dir=str(tmp_path))


def test_engine_key_changes_with_each_part():
    base = dict(model_hash="abc", trt_version="10.3.0", compute_capability=(8, 7), precision="fp16",
                export_version="2")
    key = engines.engine_key(**base)
    assert "sm87" in key and "fp16" in key and "trt10.3.0" in key
    for change in (dict(model_hash="abd"), dict(trt_version="10.4.0"), dict(compute_capability=(9, 0)),
                   dict(precision="bf16"), dict(export_version="3")):
        assert engines.engine_key(**{**base, **change}) != key, change
    assert engines.engine_key(**base, limits=engines.EngineLimits(max_context=2048)) != key
    with pytest.raises(ValueError):
        engines.engine_key(**{**base, "precision": "int8"})


def test_engine_dir_follows_the_weights(tiny_model_dir, tmp_path):
    import shutil

    a = engines.engine_dir(str(tmp_path), str(tiny_model_dir), "fp16", "10.3.0", (8, 7))
    other = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, other)
    assert engines.engine_dir(str(tmp_path), str(other), "fp16", "10.3.0", (8, 7)) == a  # same bytes, same key
    cfg = other / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    assert engines.engine_dir(str(tmp_path), str(other), "fp16", "10.3.0", (8, 7)) != a


def test_profiles_cover_prefill_and_step(tiny_model_dir, tmp_path):
    _, manifest = export.ensure_exported(str(tiny_model_dir), str(tmp_path))
    shapes = engines.profiles(manifest, engines.EngineLimits())
    assert len(shapes["decoder"]) == 2
    names = set(manifest["inputs"]["decoder"])
    for profile in shapes["decoder"] + shapes["vision"]:
        for name, (lo, opt, hi) in profile.items():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name
        assert set(profile) in (names, {"pixel_values"})
    step = shapes["decoder"][1]
    assert step["input_ids"][2][1] == 1 and step["past_key_0"][0][2] >= 1


def test_cli_exports_onnx_and_names_missing_tensorrt(tiny_model_dir, tmp_path, monkeypatch, capsys):
    assert build_engines_main(["--model", str(tiny_model_dir), "--artifacts-dir", str(tmp_path), "--onnx-only"]) == 0
    assert "ONNX graphs:" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert build_engines_main(["--model", str(tiny_model_dir), "--artifacts-dir", str(tmp_path)]) == 2
    assert "tensorrt Python package not importable" in capsys.readouterr().err
