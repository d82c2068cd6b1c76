"""int8 / int4 graphs: quantized from the fp32 graphs by onnxruntime's tools, cached per precision,
loaded and decoded by the onnxruntime backend, and faithful where fp32's own logits are decisive.

The tiny checkpoints are too narrow for quantization to mean anything about a real model (the
backend says so in its caveat); what they prove is the path: the graphs export, load and decode,
tokens equal fp32's wherever fp32's top-two margin exceeds the error measured on other inputs,
and the cache keys each precision apart. bench/precision_check.py and bench/bench_refer.py
measure the full-size architecture.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kosmos2_ros.core.backends.base import BackendUnavailable
from kosmos2_ros.core.backends.onnx import export, quantize
from kosmos2_ros.core.backends.onnx.backend import OnnxBackend
from kosmos2_ros.core.model.decoding import Row, generate
from kosmos2_ros.core.model.loading import TextCodec, load_processor
from kosmos2_ros.core.serving.config import ConfigError, Kosmos2Config
from kosmos2_ros.fixtures.scenes import draw_scene

QUANTIZED = ("int8", "int4")
#: Prompts the logit error is measured on, and the ones it must predict agreement on.
CALIBRATION = ("<grounding><phrase> the red square</phrase>", "<grounding>An image of")
HELD_OUT = ("<grounding><phrase> the blue square</phrase>", "<grounding><phrase> the green square</phrase>",
            "<grounding> Question: What is on the left? Answer:", "<grounding> Describe this image in detail:")


@pytest.fixture(scope="module")
def graphs(tiny_model_dir, tmp_path_factory):
    art = tmp_path_factory.mktemp("artifacts_q")
    backends = {p: OnnxBackend(str(tiny_model_dir), device="cpu", precision=p, artifacts_dir=str(art))
                for p in ("fp32",) + QUANTIZED}
    yield art, backends
    for b in backends.values():
        b.close()


def _pixels(processor, seed):
    rgb, _ = draw_scene(320, 240, rng=np.random.default_rng(seed))
    return np.asarray(processor.image_processor(rgb, return_tensors="np")["pixel_values"], dtype=np.float32)


def _ops(out, manifest, precision, graph):
    import onnx

    return onnx.load(str(out / export.graph_files(manifest, precision)[graph]))


def test_quantized_graphs_hold_quantized_matrix_products_only(graphs):
    import onnx

    _, backends = graphs
    out = backends["int8"].graph_dir
    manifest = export.read_manifest(out)
    ops = {(p, g): {n.op_type for n in _ops(out, manifest, p, g).graph.node}
           for p in QUANTIZED for g in ("vision", "decoder")}
    assert "MatMulInteger" in ops["int8", "vision"] and "MatMulInteger" in ops["int8", "decoder"]
    assert "MatMulInteger" in ops["int4", "vision"]           # the ViT is int8 in both (compute-bound)
    assert "MatMulNBits" in ops["int4", "decoder"] and "MatMulInteger" not in ops["int4", "decoder"]
    decoder = _ops(out, manifest, "int4", "decoder")
    assert [o.name for o in decoder.graph.output] == export.decoder_names(manifest["layers"])[1]
    floats = {i.name for i in decoder.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert any(n.op_type == "Gather" and n.input[0] in floats for n in decoder.graph.node), \
        "the token embedding stays a Gather on fp32 rows"
    vision = _ops(out, manifest, "int8", "vision")
    kept = [n for n in vision.graph.node if n.op_type == "MatMul" and n.name.startswith(quantize.PROJECTION)]
    assert kept, "the image-to-text projection stays fp32"
    stats = manifest["variants"]["int4"]["quantization"]["stats"]
    assert stats["decoder"]["quantized"] == 6 * manifest["layers"] + 1    # q k v out fc1 fc2 per layer, lm_head


def test_cache_keys_differ_per_precision_and_follow_the_recipe(graphs, tiny_model_dir, monkeypatch):
    art, backends = graphs
    out = backends["int8"].graph_dir
    manifest = export.read_manifest(out)
    files = {p: export.graph_files(manifest, p)["decoder"] for p in ("fp32",) + QUANTIZED}
    assert len(set(files.values())) == 3
    digests = {p: (out / f).read_bytes() for p, f in files.items()}
    assert len({hash(d) for d in digests.values()}) == 3
    for p in QUANTIZED:
        assert quantize.is_current(manifest["variants"][p], p)
    # Cached: a second backend quantizes nothing.
    stamp = (out / files["int4"]).stat().st_mtime_ns
    OnnxBackend(str(tiny_model_dir), device="cpu", precision="int4", artifacts_dir=str(art)).close()
    assert (out / files["int4"]).stat().st_mtime_ns == stamp
    # Graphs made by another onnxruntime (on a desktop, copied to a robot) are kept.
    other_tool = dict(manifest["variants"]["int4"], quantization=dict(manifest["variants"]["int4"]["quantization"],
                                                                       tool="onnxruntime 0.0.1"))
    assert quantize.is_current(other_tool, "int4")
    # Another recipe quantizes again.
    changed = dict(quantize.RECIPES, int4=dict(quantize.RECIPES["int4"],
                                                decoder=quantize.GraphRecipe("weight-only", bits=4, block_size=32)))
    monkeypatch.setattr(quantize, "RECIPES", changed)
    _, again = export.ensure_exported(str(tiny_model_dir), str(art), precision="int4")
    assert again["variants"]["int4"]["quantization"]["graphs"]["decoder"]["block_size"] == 32
    assert json.loads((out / export.MANIFEST_FILE).read_text())["variants"]["int4"]["quantization"] \
        == again["variants"]["int4"]["quantization"]
    assert (out / files["int4"]).stat().st_mtime_ns != stamp


@pytest.mark.parametrize("precision", QUANTIZED)
def test_tokens_equal_fp32_wherever_fp32_is_decisive(graphs, tiny_model_dir, precision):
    """The logit error measured on calibration prompts predicts agreement on held-out prompts and
    scenes: a greedy token may differ only where fp32's own top-two margin is within
    NEAR_TIE_FACTOR x that error."""
    _, backends = graphs
    ref, low = backends["fp32"], backends[precision]
    processor = load_processor(str(tiny_model_dir))
    codec = TextCodec(processor)
    pixels = _pixels(processor, 1)
    e_ref, e_low = ref.encode_image(pixels), low.encode_image(pixels)
    err = 0.0
    for prompt in CALIBRATION:
        p = codec.encode(prompt)
        tokens = generate(ref, e_ref, [Row(p.input_ids, p.image_mask, 10)], codec.vocab)[0].token_ids
        diff, _ = export.forced_margins(ref, low, e_ref, e_low, p.input_ids, p.image_mask, tokens)
        err = max(err, diff)
    assert 0.0 < err < 10.0, err     # quantized, so not exact; and not broken
    checked = equal = 0
    for seed in (2, 3):
        pixels = _pixels(processor, seed)
        e_ref, e_low = ref.encode_image(pixels), low.encode_image(pixels)
        for prompt in HELD_OUT:
            p = codec.encode(prompt)
            row = [Row(p.input_ids, p.image_mask, 10)]
            tokens = generate(ref, e_ref, row, codec.vocab)[0].token_ids
            mine = generate(low, e_low, row, codec.vocab)[0].token_ids
            logits = export.forced_logits(ref, e_ref, p.input_ids, p.image_mask, tokens)
            margin = export.first_divergence(tokens, mine, logits)
            checked += 1
            equal += margin is None
            assert margin is None or margin <= export.NEAR_TIE_FACTOR * err, (prompt, seed, margin, err)
    assert equal >= checked // 2, f"{equal} of {checked} held-out generations equal fp32's"


@pytest.mark.parametrize("precision", QUANTIZED)
def test_pipeline_grounds_with_quantized_graphs(graphs, tiny_model_dir, precision):
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.core.serving.pipeline import Command, Pipeline

    _, backends = graphs
    processor = load_processor(str(tiny_model_dir))
    rgb, _ = draw_scene(640, 480, rng=np.random.default_rng(4))
    cfg = Kosmos2Config(model=str(tiny_model_dir), backend="onnxruntime", precision=precision, enable_3d=False)
    pipe = Pipeline(cfg, backends[precision], processor)
    results = pipe.run_batch([Command(id=str(i), task="refer", text=e) for i, e in
                              enumerate(("the red square", "the blue square"))], Frame(rgb=rgb, stamp_ns=1, frame_id="c"))
    assert [r.status for r in results] == [0, 0], [r.error for r in results]
    assert all(r.entities and r.entities[0].boxes_norm for r in results)
    assert "too small to quantize sensibly" in pipe.backend_reason and precision in pipe.backend_reason


def test_bad_precisions_refused_with_the_choices(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="int8.*int4"):
        Kosmos2Config(precision="int3")
    with pytest.raises(ConfigError, match="backend torch runs fp32, fp16, bf16, not int8 .use backend: onnxruntime"):
        Kosmos2Config(backend="torch", precision="int8")
    with pytest.raises(ConfigError, match="backend tensorrt runs .*not int4"):
        Kosmos2Config(backend="tensorrt", precision="int4")
    with pytest.raises(BackendUnavailable, match="runs precisions fp32, int8, int4"):
        OnnxBackend(str(tiny_model_dir), device="cpu", precision="fp16", artifacts_dir=str(tmp_path))
    with pytest.raises(export.ExportError, match="precision must be one of"):
        export.ensure_exported(str(tiny_model_dir), str(tmp_path), precision="int3")


def test_quantized_graphs_run_on_the_cpu(tiny_model_dir, tmp_path):
    from kosmos2_ros.core.backends import onnx as onnx_backend

    with pytest.raises(BackendUnavailable, match="int8 runs on the CPU"):
        OnnxBackend(str(tiny_model_dir), device="cuda", precision="int8", artifacts_dir=str(tmp_path))
    assert "runs on the CPU" in onnx_backend.unusable(str(tiny_model_dir), {"precision": "int4", "device": "cuda:0",
                                                                         "artifacts_dir": str(tmp_path)})


def test_auto_picks_onnxruntime_for_a_quantized_precision(tiny_model_dir, tmp_path):
    from kosmos2_ros.core.backends import registry

    name, options, why = registry.choose_backend(str(tiny_model_dir), {"precision": "int8",
                                                                     "artifacts_dir": str(tmp_path)})
    assert (name, options["device"], options["precision"]) == ("onnxruntime", "cpu", "int8"), why


def test_cpu_problem_names_the_missing_instructions(monkeypatch):
    monkeypatch.setattr(quantize.platform, "machine", lambda: "x86_64")
    assert quantize.cpu_problem(frozenset({"avx2", "avx512f", "avx512_vnni"})) == ""
    assert quantize.cpu_problem(frozenset({"avx2", "avx_vnni"})) == ""
    assert "VNNI" in quantize.cpu_problem(frozenset({"avx2", "fma"}))
    monkeypatch.setattr(quantize.platform, "machine", lambda: "aarch64")
    assert quantize.cpu_problem(frozenset({"asimd", "asimddp"})) == ""
    assert "dotprod" in quantize.cpu_problem(frozenset({"asimd"}))
    assert quantize.cpu_problem(frozenset()) == ""      # cannot tell: no claim


def test_two_processes_building_the_same_graphs_take_turns(tiny_model_dir, tmp_path):
    """Two nodes started on an empty cache while a third process builds: both wait for the lock, then
    one exports and quantizes and the other finds its graphs (neither deletes what the other wrote;
    the manifest keeps every variant)."""
    code = ("import sys; from kosmos2_ros.core.backends.onnx import export; "
            "export.ensure_exported(sys.argv[1], sys.argv[2], precision='int8', log=lambda m: print(m, flush=True))")
    root = Path(__file__).resolve().parents[1]
    out = export.onnx_dir(str(tmp_path), str(tiny_model_dir))
    procs, outs = [], []
    try:
        with export.build_lock(out):     # the "third process": this test holds the lock
            for _ in range(2):
                procs.append(subprocess.Popen([sys.executable, "-c", code, str(tiny_model_dir), str(tmp_path)],
                                              cwd=str(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True))
            for p in procs:              # each says it waits (its first line) before anything is built
                assert p.stdout.readline().startswith("waiting for another process building the graphs")
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    logs = "\n".join(outs)
    assert logs.count("exported fp32 ") == 2 and logs.count("quantized decoder to int8") == 1, logs   # vision + decoder, once
    assert set(export.read_manifest(out)["variants"]) == {"fp32", "int8"}
    assert not list(out.glob("*.tmp*")) and not list(out.parent.glob("*.tmp*"))
