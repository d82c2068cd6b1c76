"""TensorRT backend without TensorRT: clear errors naming what is missing; engine cache keys."""
from __future__ import annotations

import json
import shutil
import sys
import types

import pytest

from kosmos2_ros.core.backends import create_backend
from kosmos2_ros.core.backends.base import BackendUnavailable
from kosmos2_ros.core.backends.onnx import export
from kosmos2_ros.core.backends.tensorrt import engines
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


def test_step_shapes_fit_the_step_profile_for_every_arena(tiny_model_dir, tmp_path):
    """Every arena the backend can make (rows 1..max_batch, every capacity up to the limit) binds
    within the step profile the engine is built with."""
    from kosmos2_ros.core.backends.kv_cache import CAPACITY_STEP, capacity_for

    _, manifest = export.ensure_exported(str(tiny_model_dir), str(tmp_path))
    limits = engines.EngineLimits()
    step = engines.profiles(manifest, limits)["decoder"][1]
    limit = engines.arena_limit(manifest, limits)
    caps = sorted({capacity_for(n, limit) for n in range(0, limit, CAPACITY_STEP // 2)} | {capacity_for(limit - 1, limit)})
    for rows in (1, limits.max_batch):
        for cap in caps:
            shapes = {"input_ids": (rows, 1), "attention_mask": (rows, cap + 2),
                      "past_key_0": (rows, manifest["heads"], cap + 1, manifest["head_dim"])}
            for name, shape in shapes.items():
                lo, _, hi = step[name]
                assert all(a <= s <= b for a, s, b in zip(lo, shape, hi)), (name, shape, lo, hi)


def test_engines_with_other_limits_are_found(tmp_path):
    """Engines built with `--max-context 2048` are used by a node asking for the default limits."""
    wanted = tmp_path / "engines" / engines.engine_key("abc", "10.3.0", (8, 7), "fp16", "3")
    assert engines.read_engines(wanted) is None and engines.other_limits(wanted) is None
    built = {}
    for lim in (engines.EngineLimits(max_context=2048), engines.EngineLimits(max_batch=2)):
        d = tmp_path / "engines" / engines.engine_key("abc", "10.3.0", (8, 7), "fp16", "3", lim)
        d.mkdir(parents=True)
        (d / "decoder.plan").write_bytes(b"x")
        (d / "engines.json").write_text(json.dumps({"files": {"decoder": "decoder.plan"}, "limits": lim.__dict__}))
        built[lim.max_context] = d
    big = engines.EngineLimits(max_context=4096)
    other = tmp_path / "engines" / engines.engine_key("abc", "10.3.0", (8, 7), "bf16", "3", big)
    other.mkdir()   # another precision (and incomplete): never chosen
    found = engines.other_limits(wanted)
    assert found is not None and found[0] == built[2048]
    (built[2048] / "decoder.plan").unlink()            # incomplete sets are skipped
    assert engines.other_limits(wanted)[0] == built[1024]


def test_fp16_check_measures_headroom_and_can_refuse(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from kosmos2_ros import engine_cli

    assert engine_cli.fp16_check(str(tiny_model_dir))
    assert "fp16 headroom" in capsys.readouterr().out
    monkeypatch.setattr(engine_cli, "FP16_MIN_HEADROOM", 1e30)
    assert build_engines_main(["--model", str(tiny_model_dir), "--artifacts-dir", str(tmp_path)]) == 5
    assert "--precision bf16" in capsys.readouterr().err


# -- errors a user can act on (TensorRT version, GPU precision, engines from elsewhere) -------------
def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("version", ["9.3.0", "10.0.1", "10.2.0.19"])
def test_tensorrt_older_than_jetpack6_is_refused(version):
    with pytest.raises(BackendUnavailable) as exc:
        engines.check_tensorrt_version(version)
    text = _one_line(exc)
    assert f"TensorRT {version} found" in text and "needs TensorRT >= 10.3" in text and "pip install -U tensorrt" in text


@pytest.mark.parametrize("version", ["10.3.0", "10.3.0.30", "10.16.0", "11.4.0", "11.4.1.post1"])
def test_supported_tensorrt_versions_pass(version):
    engines.check_tensorrt_version(version)


def test_old_tensorrt_is_refused_through_the_backend(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.1.0"))
    with pytest.raises(BackendUnavailable, match=r"TensorRT 10.1.0 found; .*needs TensorRT >= 10.3"):
        create_backend("tensorrt", str(tiny_model_dir), artifacts_dir=str(tmp_path))


@pytest.mark.parametrize("precision, cc, instead", [("bf16", (7, 5), "fp16 or fp32"), ("bf16", (6, 1), "fp32"),
                                                     ("fp16", (6, 1), "fp32"), ("fp16", (5, 0), "fp32")])
def test_gpu_without_the_precision_is_told_what_to_pick(precision, cc, instead):
    with pytest.raises(BackendUnavailable) as exc:
        engines.check_precision(precision, cc)
    text = _one_line(exc)
    assert f"sm{cc[0]}{cc[1]}" in text and f"no native {precision}" in text and f"use precision {instead}" in text
    assert f"--precision {instead.split()[0]}" in text


@pytest.mark.parametrize("precision, cc", [("bf16", (8, 7)), ("bf16", (9, 0)), ("fp16", (7, 2)), ("fp16", (5, 3)),
                                           ("fp32", (6, 1))])
def test_gpu_with_the_precision_passes(precision, cc):
    engines.check_precision(precision, cc)


def test_bf16_on_a_gpu_without_it_fails_before_any_build(tiny_model_dir, tmp_path, monkeypatch):
    """Through the backend: the GPU check comes before engines are looked up or built."""
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (7, 5))
    with pytest.raises(BackendUnavailable, match=r"sm75\) has no native bf16 .* use precision fp16 or fp32"):
        create_backend("tensorrt", str(tiny_model_dir), device="cuda", precision="bf16", artifacts_dir=str(tmp_path),
                       build_engines=True)
    assert not (tmp_path / "engines").exists() and not (tmp_path / "onnx").exists()


def test_engines_from_another_tensorrt_or_gpu_are_refused_with_the_rebuild_command(tmp_path):
    meta = {"tensorrt": "10.3.0", "compute_capability": [8, 7], "precision": "fp16", "files": {"decoder": "d.plan"}}
    assert engines.engine_mismatch(meta, "10.3.0", (8, 7)) is None
    for trt_version, cc in (("11.4.0", (8, 7)), ("10.3.0", (8, 9))):
        why = engines.engine_mismatch(meta, trt_version, cc)
        assert why == f"engines built by TensorRT 10.3.0 for sm87, this is TensorRT {trt_version} on sm{cc[0]}{cc[1]}"
        with pytest.raises(BackendUnavailable) as exc:   # refused before TensorRT is asked to deserialise
            engines.load_engines(types.SimpleNamespace(__version__=trt_version), tmp_path, meta, cc, "/models/k2")
        text = _one_line(exc)
        assert why in text and "kosmos2-build-engines --model /models/k2 --precision fp16" in text


def test_engine_tensor_types_map_to_torch():
    import torch

    assert [engines.torch_dtype(n, torch) for n in ("FLOAT", "HALF", "BF16", "INT64")] == \
        [torch.float32, torch.float16, torch.bfloat16, torch.int64]
    with pytest.raises(BackendUnavailable, match="FP8 is not one the tensorrt backend binds.*kosmos2-build-engines"):
        engines.torch_dtype("FP8", torch)


def test_strongly_typed_network_flag():
    """The bit the installed TensorRT gives STRONGLY_TYPED (1 in 10.3's NvInfer.h; 0 in 11, which
    dropped EXPLICIT_BATCH), and no flag once a release drops it."""
    for bit in (1, 0):
        flags = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=bit))
        assert engines.network_flags(flags) == 1 << bit
    assert engines.network_flags(types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())) == 0
