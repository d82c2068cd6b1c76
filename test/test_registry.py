"""The backend registry: one list read by config, CLIs and create_backend; `auto` picks the fastest usable."""
from __future__ import annotations

import numpy as np
import pytest

from kosmos2_ros.cli import _ground_parser
from kosmos2_ros.core.backends import registry
from kosmos2_ros.core.backends.onnx.backend import OnnxBackend
from kosmos2_ros.core.serving.config import BACKENDS, ConfigError, Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline


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
    name, options, why = registry.choose_backend(str(tiny_model_dir), {"device": "cpu", "precision": "auto",
                                                                       "artifacts_dir": str(tmp_path)})
    assert name == "onnxruntime" and options["device"] == "cpu" and options["precision"] == "fp32"
    assert why.startswith("backend auto chose onnxruntime on cpu (fp32)")


def test_auto_on_this_machine_tries_the_gpu_first(tiny_model_dir, tmp_path):
    """With device auto and no GPU (as here, the CUDA probe answers no), every GPU candidate is
    passed over with its reason, in the order of PREFERENCE, then onnxruntime on the CPU."""
    name, options, why = registry.choose_backend(str(tiny_model_dir), {"artifacts_dir": str(tmp_path)})
    assert (name, options["device"], options["precision"]) == ("onnxruntime", "cpu", "fp32")
    assert why.index("not tensorrt on cuda") < why.index("not torch on cuda: torch sees no CUDA device") \
        < why.index("not onnxruntime on cuda")


def _gpu(monkeypatch, cc=(9, 0), tensorrt_reason="tensorrt not installed"):
    """Answer the CUDA probe 'yes': one GPU of compute capability `cc`, CPU onnxruntime, TensorRT as given."""
    import kosmos2_ros.core.backends.torch as torch_folder

    monkeypatch.setattr(registry, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(torch_folder, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(registry, "cuda_capability", lambda device="cuda": cc)
    monkeypatch.setattr(registry.BY_NAME["tensorrt"].module(), "unusable",
                        lambda *_: tensorrt_reason)


def test_auto_picks_torch_on_the_gpu_over_onnxruntime_on_the_cpu(tiny_model_dir, tmp_path, monkeypatch):
    """A desktop with a CUDA GPU, CUDA torch, the CPU onnxruntime and no TensorRT: torch on the GPU, fp16."""
    _gpu(monkeypatch)
    name, options, why = registry.choose_backend(str(tiny_model_dir), {"artifacts_dir": str(tmp_path)})
    assert (name, options["device"], options["precision"]) == ("torch", "cuda", "fp16")
    assert why == "backend auto chose torch on cuda (fp16) (not tensorrt on cuda: tensorrt not installed)"


def test_auto_picks_tensorrt_when_its_engines_are_there(tiny_model_dir, tmp_path, monkeypatch):
    _gpu(monkeypatch, tensorrt_reason="")
    name, options, why = registry.choose_backend(str(tiny_model_dir), {"artifacts_dir": str(tmp_path)})
    assert (name, options["device"], options["precision"]) == ("tensorrt", "cuda", "fp16")
    assert why == "backend auto chose tensorrt on cuda (fp16)"


def test_device_cpu_keeps_auto_on_the_cpu_even_with_a_gpu(tiny_model_dir, tmp_path, monkeypatch):
    _gpu(monkeypatch)
    name, options, _ = registry.choose_backend(str(tiny_model_dir), {"device": "cpu", "artifacts_dir": str(tmp_path)})
    assert (name, options["device"], options["precision"]) == ("onnxruntime", "cpu", "fp32")


@pytest.mark.parametrize("cc, mode, want", [((9, 0), "auto", "fp16"), ((8, 7), "static", "fp16"),
                                            ((8, 0), "reference", "bf16"), ((7, 5), "reference", "fp16"),
                                            ((6, 1), "auto", "fp32"), ((5, 0), "auto", "fp32")])
def test_precision_auto_on_a_gpu(monkeypatch, cc, mode, want):
    """fp16 on a GPU (the mixed graphs keep fp32 where fp16's range is at risk); bf16 only for
    torch's reference mode where the GPU has it; fp32 where the GPU has no fast fp16."""
    monkeypatch.setattr(registry, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(registry, "cuda_capability", lambda device="cuda": cc)
    assert registry.resolve_precision("torch", "cuda", "auto", {"torch_mode": mode}) == want
    assert registry.resolve_precision("onnxruntime", "cuda", "auto", {}) == "fp32"   # it runs fp32 graphs only
    assert registry.resolve_precision("torch", "cpu", "auto", {}) == "fp32"
    assert registry.resolve_precision("torch", "cuda", "bf16", {}) == "bf16"           # an explicit one stays


def test_explicit_backend_resolves_precision_auto_where_it_runs(tiny_model_dir):
    backend = registry.create_backend("torch", str(tiny_model_dir), device="cpu", precision="auto")
    assert backend.precision == "fp32" and backend.mode == "reference"
    backend.close()


def test_auto_falls_back_to_torch_without_onnxruntime_or_at_reduced_precision(tiny_model_dir, tmp_path, monkeypatch):
    name, _, why = registry.choose_backend(str(tiny_model_dir), {"device": "cpu", "precision": "bf16",
                                                                 "artifacts_dir": str(tmp_path)})
    assert name == "torch" and "not onnxruntime on cpu: it runs fp32, int8, int4" in why
    monkeypatch.setattr(registry.BY_NAME["onnxruntime"].module(), "unusable", lambda *_: "onnxruntime not installed")
    name, _, why = registry.choose_backend(str(tiny_model_dir), {"device": "cpu", "artifacts_dir": str(tmp_path)})
    assert name == "torch" and "not onnxruntime on cpu: onnxruntime not installed" in why


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
            assert chosen == "onnxruntime" and reason.startswith("backend auto chose onnxruntime on cpu")
        else:
            assert chosen == "torch" and reason == "backend torch (configured), fp32"
    assert tokens["auto"] == tokens["torch"] and tokens["torch"]
