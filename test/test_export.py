"""ONNX export: fixed names, dynamic axes, the traced decoder equal to transformers on every path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kosmos2_ros.core import export
from kosmos2_ros.core.backends.base import position_ids
from kosmos2_ros.core.loading import TextCodec, load_processor


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
    import shutil

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
    embeds = model.get_image_features(torch.randn(1, 3, 224, 224), return_dict=True).pooler_output
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
