"""The backend registry: one list read by config, CLIs and create_backend; `auto` picks the fastest usable."""
from __future__ import annotations

import numpy as np
import pytest

from kosmos2_ros.cli import _ground_parser
from kosmos2_ros.core.backends import registry
from kosmos2_ros.core.backends.onnx.backend import OnnxBackend
from kosmos2_ros.core.config import BACKENDS, ConfigError, Kosmos2Config
from kosmos2_ros.core.frames import Frame
from kosmos2_ros.core.pipeline import Command, Pipeline


def test_config_and_cli_accept_exactly_the_registry_names():
    assert BACKENDS == registry.CHOICES == ("auto", "tensorrt", "onnxruntime", "torch")
    for name in registry.CHOICES:
        assert Kosmos2Config(backend=name).backend == name
    with pytest.raises(ConfigError, match="backend"):
        Kosmos2Config(backend="llama.cpp")
    choices = next(a.choices for a in _ground_parser()._actions if a.dest == "backend")
    assert tuple(choices) == registry.CHOICES


def test_each_backend_gets_only_the_options_it_declares(tiny_model_dir, tmp_path):
    """One set of options (the config's) serves every backend; an option no backend takes is refused."""
    backend = registry.create_backend("onnxruntime", str(tiny_model_dir), device="cpu", artifacts_dir=str(tmp_path),
                                      build_engines=True, cuda_graph=False)   # tensorrt's options: left out
    assert isinstance(backend, OnnxBackend)
    backend.close()
    with pytest.raises(TypeError, match="unknown backend option.*colour"):
        registry.create_backend("torch", str(tiny_model_dir), colour="red")
    with pytest.raises(ValueError, match="unknown backend 'nope'.*auto, tensorrt, onnxruntime, torch"):
        registry.create_backend("nope", str(tiny_model_dir))


def test_auto_chooses_onnxruntime_here_and_says_why(tiny_model_dir, tmp_path):
    name, why = registry.choose_backend(str(tiny_model_dir), {"device": "cpu", "precision": "fp32",
                                                              "artifacts_dir": str(tmp_path)})
    assert name == "onnxruntime"
    assert why.startswith("backend auto chose onnxruntime (not tensorrt: ") and "tensorrt" in why


def test_auto_falls_back_to_torch_without_onnxruntime_or_at_reduced_precision(tiny_model_dir, tmp_path, monkeypatch):
    name, why = registry.choose_backend(str(tiny_model_dir), {"device": "cpu", "precision": "bf16",
                                                              "artifacts_dir": str(tmp_path)})
    assert name == "torch" and "not onnxruntime: it runs the fp32 graphs, precision is bf16" in why
    monkeypatch.setattr(registry.BY_NAME["onnxruntime"].module(), "unusable", lambda *_: "onnxruntime not installed")
    name, why = registry.choose_backend(str(tiny_model_dir), {"device": "cpu", "artifacts_dir": str(tmp_path)})
    assert name == "torch" and "not onnxruntime: onnxruntime not installed" in why


def test_auto_through_the_pipeline_gives_the_tokens_torch_gives(tiny_model_dir, tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    cmd = Command(id="a", task="refer", text="the red mug", decoding="free", max_new_tokens=10)
    tokens = {}
    for name in ("auto", "torch"):
        pipe = Pipeline.load(Kosmos2Config(model=str(tiny_model_dir), backend=name, device="cpu",
                                           artifacts_dir=str(tmp_path), allow_download=False))
        tokens[name] = pipe.run(cmd, Frame(rgb=rgb)).token_ids   # a frame caches its backend's encoding
        chosen = pipe.backend.name
        reason = pipe.backend_reason
        pipe.close()
        if name == "auto":
            assert chosen == "onnxruntime" and reason.startswith("backend auto chose onnxruntime")
        else:
            assert chosen == "torch" and reason == "backend torch (configured)"
    assert tokens["auto"] == tokens["torch"] and tokens["torch"]
