"""ONNX export: fixed names, dynamic axes, the traced decoder equal to transformers on every path."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from kosmos2_ros.core.backends.base import position_ids
from kosmos2_ros.core.backends.modules import image_features
from kosmos2_ros.core.backends.onnx import export
from kosmos2_ros.core.model.loading import TextCodec, load_processor


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    art = tmp_path_factory.mktemp("artifacts")
    out, manifest = export.ensure_exported(str(tiny_model_dir), str(art))
    return art, out, manifest


def test_graph_names_and_dynamic_axes(exported):
    import onnx

    _, out, manifest = exported
    vision = onnx.load(str(out / manifest["files"]["vision"]))
    assert [i.name for i in vision.graph.input] == ["pixel_values"]
    assert [o.name for o in vision.graph.output] == ["image_embeds"]
    decoder = onnx.load(str(out / manifest["files"]["decoder"]))
    ins, outs = export.decoder_names(manifest["layers"])
    assert [i.name for i in decoder.graph.input] == ins
    assert [o.name for o in decoder.graph.output] == outs
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in decoder.graph.input}
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["past_key_0"] == ["batch", manifest["heads"], "past", manifest["head_dim"]]
    assert dims["attention_mask"] == ["batch", "total"]


def test_cache_reused_and_keyed_by_weights(exported, tiny_model_dir, tmp_path):
    art, out, _ = exported
    stamp = (out / export.MANIFEST_FILE).stat().st_mtime_ns
    again, _ = export.ensure_exported(str(tiny_model_dir), str(art))
    assert again == out and (out / export.MANIFEST_FILE).stat().st_mtime_ns == stamp
    # Another checkpoint (different weights) gets another directory.
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    with open(next(other.glob("*.safetensors")), "ab") as fh:
        fh.write(b" ")
    assert export.onnx_dir(str(art), str(other)) != out
    with pytest.raises(export.ExportError):
        export.ensure_exported(str(other), str(tmp_path / "none"), allow_export=False)


def _hf_logits(model, ids, embeds, mask, past=None):
    out = model.text_model(input_ids=torch.tensor([ids]), image_embeds=embeds,
                           image_embeds_position_mask=torch.tensor([mask]), past_key_values=past, use_cache=True)
    return out.logits[0, -1], out.past_key_values


def test_decoder_module_matches_transformers_on_all_paths(tiny_model_dir):
    """Prefill from scratch, suffix prefill on a past, and single-token steps."""
    model = export.load_for_export(str(tiny_model_dir))
    codec = TextCodec(load_processor(str(tiny_model_dir)))
    dec = export.decoder_module(model)
    pad = int(model.config.text_config.pad_token_id)
    heads = model.config.text_config.attention_heads
    hd = model.config.text_config.embed_dim // heads
    layers = model.config.text_config.layers
    p = codec.encode("<grounding><phrase> the red mug</phrase>")
    embeds = image_features(model, torch.randn(1, 3, 224, 224))
    split = p.input_ids.index(codec.vocab.grounding) + 1
    with torch.no_grad():
        ref, past = _hf_logits(model, p.input_ids[:split], embeds, p.image_mask[:split])
        kv = [torch.zeros(1, heads, 0, hd) for _ in range(2 * layers)]
        ids = p.input_ids[:split]

        def run(chunk, mask, kv, past_len, image):
            out = dec(torch.tensor([chunk]), image, torch.tensor([mask]),
                      torch.from_numpy(position_ids(chunk, past_len, pad))[None],
                      torch.ones(1, past_len + len(chunk), dtype=torch.long), *kv)
            return out[0][0], [torch.cat([a, b], dim=2) for a, b in zip(kv, out[1:])]

        got, kv = run(ids, p.image_mask[:split], kv, 0, embeds)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        suffix = p.input_ids[split:]
        ref, past = _hf_logits(model, suffix, None, [0] * len(suffix), past)
        got, kv = run(suffix, [0] * len(suffix), kv, split, torch.zeros(1, 1, embeds.shape[-1]))
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        length = len(p.input_ids)
        for _ in range(4):
            tok = int(ref.argmax())
            assert tok == int(got.argmax())
            ref, past = _hf_logits(model, [tok], None, [0], past)
            got, kv = run([tok], [0], kv, length, torch.zeros(1, 1, embeds.shape[-1]))
            length += 1
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        assert kv[0].shape[2] == length


def test_fp16_headroom_reports_peaks(tiny_model_dir):
    model = export.load_for_export(str(tiny_model_dir))
    codec = TextCodec(load_processor(str(tiny_model_dir)))
    p = codec.encode("<grounding>An image of")
    report = export.fp16_headroom(model, torch.randn(1, 3, 224, 224), torch.tensor([p.input_ids]),
                                  torch.tensor([p.image_mask]))
    assert report["max_abs"] > 0 and np.isfinite(report["max_abs"])
    assert report["image_embeds_scaled"] <= report["max_abs"]
    assert report["headroom"] == pytest.approx(65504.0 / report["max_abs"])


# -- the reduced-precision (strongly typed) graphs ---------------------------------------------------
REDUCED = ("fp16", "bf16")
#: Reduced-precision graph vs the fp32 graph on the trained tiny checkpoint (logits up to ~16),
#: teacher-forced on fp32's greedy tokens. Measured (bench/precision_check.py): fp16 4e-3 in the
#: logits and 4e-5 in the image embeddings, bf16 5e-2 and 2e-3; the bounds leave 4-5x.
REDUCED_LOGITS_ATOL = {"fp16": 2e-2, "bf16": 2.5e-1}
REDUCED_EMBEDS_ATOL = {"fp16": 2e-4, "bf16": 1e-2}
ONNX_ELEM = {"fp32": 1, "fp16": 10, "bf16": 16}   # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16


@pytest.fixture(scope="module")
def reduced(exported, tiny_model_dir):
    art, _, _ = exported
    model = export.load_for_export(str(tiny_model_dir))
    for precision in REDUCED:
        out, manifest = export.ensure_exported(str(tiny_model_dir), str(art), model=model, precision=precision)
    return art, out, manifest, model


def _types(path):
    """{tensor name: onnx elem type} of a graph after shape inference, and the graph."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types, graph


@pytest.mark.parametrize("precision", REDUCED)
def test_reduced_graphs_carry_the_intended_types(reduced, precision):
    """Matrix products in the reduced type; LayerNorm, softmax, interface (pixels, image
    embeddings, logits) in fp32; the KV cache in the reduced type."""
    _, out, manifest, model = reduced
    low, f32 = ONNX_ELEM[precision], ONNX_ELEM["fp32"]
    files = export.graph_files(manifest, precision)
    assert manifest["variants"][precision]["dtypes"]["kv"] == export.ONNX_TYPES[precision]
    for graph_name in ("vision", "decoder"):
        types, graph = _types(out / files[graph_name])
        io = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
        products = [types.get(n.input[0]) for n in graph.node if n.op_type in ("MatMul", "Gemm")]
        for node in graph.node:
            if node.op_type in ("LayerNormalization", "Softmax"):
                assert types[node.input[0]] == f32, (graph_name, node.name)
        if graph_name == "vision":
            assert io == {"pixel_values": f32, "image_embeds": f32}
            # the ViT's 8 products per layer are reduced; the image-to-text projection stays fp32
            assert products.count(low) == 8 * model.config.vision_config.num_hidden_layers, products
            assert f32 in products
        else:
            assert io["logits"] == f32 and io["image_embeds"] == f32
            assert all(io[n] == low for n in manifest["inputs"]["decoder"][5:] + manifest["outputs"]["decoder"][1:])
            # every layer's 10 products (q, k, v, out, fc1, fc2; scores and values over the past and over the
            # new keys apart) and the lm_head reduced; one fp32 product counts image positions
            assert products.count(low) == 10 * manifest["layers"] + 1 and products.count(f32) == 1, products


def test_mixed_vision_module_is_transformers_in_fp32(reduced):
    """The hand-written ViT the reduced vision graphs are traced from computes transformers'
    image features exactly when its compute dtype is fp32."""
    _, _, _, model = reduced
    mixed = export._modules()[2](model, torch.float32)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = image_features(model, pixels)
        torch.testing.assert_close(mixed(pixels), want, atol=1e-6, rtol=0)


def test_variants_are_cached_beside_the_fp32_graphs(reduced, tiny_model_dir):
    art, out, manifest, _ = reduced
    assert manifest["files"] == export.graph_files(manifest, "fp32")     # what onnxruntime loads, unchanged
    stamp = (out / export.MANIFEST_FILE).stat().st_mtime_ns
    again, m2 = export.ensure_exported(str(tiny_model_dir), str(art), precision="bf16", allow_export=False)
    assert again == out and set(m2["variants"]) == {"fp32", "fp16", "bf16"}
    assert (out / export.MANIFEST_FILE).stat().st_mtime_ns == stamp


def test_onnxruntime_cpu_has_no_bf16_matmul(reduced):
    """Why the bf16 check runs the torch module the graph is traced from: if this starts failing,
    onnxruntime gained the kernel and `GraphBackend` can run the bf16 graph itself."""
    import onnxruntime as ort

    _, out, manifest, _ = reduced
    with pytest.raises(Exception, match="NOT_IMPLEMENTED.*MatMul"):
        ort.InferenceSession(str(out / export.graph_files(manifest, "bf16")["decoder"]),
                             providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("precision", REDUCED)
def test_reduced_graphs_agree_with_fp32(reduced, tiny_model_dir, precision):
    """Logits within the stated tolerance; greedy tokens equal fp32's (or differ only at near-ties
    of fp32's own logits); boxes of constrained referring expressions equal fp32's, or differ only where
    fp32's tokens were at a near-tie (the same rule: bf16's 7-bit mantissa and another torch's kernels can
    flip a first corner that fp32 chose by a hair)."""
    from kosmos2_ros.core.model.decoding import Row, generate
    from kosmos2_ros.core.serving.config import Kosmos2Config
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.core.serving.pipeline import Command, Pipeline
    from kosmos2_ros.fixtures.scenes import draw_scene

    art, _, _, model = reduced
    processor = load_processor(str(tiny_model_dir))
    codec = TextCodec(processor)
    ref = export.GraphBackend(str(tiny_model_dir), str(art), "fp32")
    low = export.GraphBackend(str(tiny_model_dir), str(art), precision, model=model)
    rgb, _ = draw_scene(320, 240, rng=np.random.default_rng(1))
    pixels = np.asarray(processor.image_processor(rgb, return_tensors="np")["pixel_values"], dtype=np.float32)
    e_ref, e_low = ref.encode_image(pixels), low.encode_image(pixels)
    np.testing.assert_allclose(e_low, e_ref, atol=REDUCED_EMBEDS_ATOL[precision], rtol=0)
    for prompt in ("<grounding><phrase> the red square</phrase>", "<grounding>An image of",
                   "<grounding> Question: What is on the left? Answer:"):
        p = codec.encode(prompt)
        tokens = generate(ref, e_ref, [Row(p.input_ids, p.image_mask, 10)], codec.vocab)[0].token_ids
        mine = generate(low, e_low, [Row(p.input_ids, p.image_mask, 10)], codec.vocab)[0].token_ids
        diff, margins = export.forced_margins(ref, low, e_ref, e_low, p.input_ids, p.image_mask, tokens)
        assert diff <= REDUCED_LOGITS_ATOL[precision], (prompt, diff)
        text, ok = export.precision_verdict(tokens == mine, margins, diff, precision)
        assert ok, (prompt, text)
    cmds = [Command(id=e, task="refer", text=e) for e in ("the red square", "the blue square", "the green square")]
    found = {}
    for name, backend in (("fp32", ref), (precision, low)):
        frame = Frame(rgb=rgb, stamp_ns=1, frame_id="cam")   # its own: a frame caches its backend's encoding
        results = Pipeline(Kosmos2Config(model=str(tiny_model_dir), enable_3d=False), backend, processor).run_batch(
            cmds, frame)
        assert all(r.status == 0 for r in results), [r.error for r in results]
        found[name] = results
    boxes = {name: [[b for ent in r.entities for b in ent.boxes_norm] for r in rs] for name, rs in found.items()}
    assert all(boxes["fp32"])
    for cmd, a, b, box_a, box_b in zip(cmds, found["fp32"], found[precision], boxes["fp32"], boxes[precision]):
        if box_a == box_b:
            continue
        p = codec.encode(f"<grounding><phrase> {cmd.text}</phrase>")
        assert p.input_ids == a.prompt_ids
        ref_logits = export.forced_logits(ref, e_ref, p.input_ids, p.image_mask, a.token_ids)
        diff, _ = export.compare_logits(ref_logits, export.forced_logits(low, e_low, p.input_ids, p.image_mask,
                                                                         a.token_ids))
        margin = export.first_divergence(a.token_ids, b.token_ids, ref_logits)
        text, ok = export.precision_verdict(False, [margin], diff, precision)
        assert ok, (cmd.text, box_a, box_b, text)


def test_fp32_residual_stream_survives_past_fp16_range(tiny_model_dir, tmp_path):
    """Why the residual stream stays fp32: with the embeddings scaled so the residual exceeds
    fp16's 65504 while every matrix product stays far inside it (fp16_headroom says so), the
    fp16 graph still gives finite logits that agree with the fp32 graph's."""
    model = export.load_for_export(str(tiny_model_dir))
    model.text_model.model.embed_scale = 1e5      # only the fp32 residual sees the scale
    codec = TextCodec(load_processor(str(tiny_model_dir)))
    p = codec.encode("<grounding><phrase> the red square</phrase>")
    pixels = torch.randn(1, 3, 224, 224)
    report = export.fp16_headroom(model, pixels, torch.tensor([p.input_ids]), torch.tensor([p.image_mask]))
    assert report["max_abs"] > export.FP16_MAX > 100 * report["reduced_max_abs"], report
    ref = export.GraphBackend(str(tiny_model_dir), str(tmp_path), "fp32", model=model)
    low = export.GraphBackend(str(tiny_model_dir), str(tmp_path), "fp16", model=model)
    e = ref.encode_image(pixels.numpy())
    a, _ = ref.prefill(e, p.input_ids, p.image_mask)
    b, _ = low.prefill(low.encode_image(pixels.numpy()), p.input_ids, p.image_mask)
    assert np.isfinite(b).all() and int(np.argmax(a)) == int(np.argmax(b))
    assert np.abs(a - b).max() <= REDUCED_LOGITS_ATOL["fp16"]


def test_the_torchscript_exporter_is_asked_for_only_where_the_flag_exists() -> None:
    """torch 2.4+ takes `dynamo=False`; torch 2.3 (JetPack 6.0) has no such argument and only that exporter."""
    import torch

    from kosmos2_ros.core.backends.onnx.export import torchscript_exporter

    def export_2_3(model, args, f, export_params=True, opset_version=None, dynamic_axes=None):  # torch 2.3's shape
        return None

    assert torchscript_exporter(export_2_3) == {}
    assert torchscript_exporter(torch.onnx.export) == {"dynamo": False}   # this torch (2.5 and 2.13 in CI)


def test_the_loaded_model_computes_image_embeddings_as_eager_attention_does(tiny_model_dir):
    """transformers 5.0-5.14's default (sdpa) masks the image-to-text projection causally; `load_kosmos2` must
    give the eager result on every transformers (the Python 3.10 CI job runs 5.0, the main suite the newest)."""
    from kosmos2_ros.core.backends.modules import kosmos2_attention, load_kosmos2

    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = image_features(load_kosmos2(str(tiny_model_dir)), pixels)
        eager = image_features(load_kosmos2(str(tiny_model_dir), attn_implementation="eager"), pixels)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
    assert kosmos2_attention() in (None, "eager")
