"""Shared greedy loop: constrained boxes equal free boxes (fewer calls); batched rows equal alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kosmos2_ros.core.backends.onnx.backend import OnnxBackend
from kosmos2_ros.core.backends.torch.backend import TorchBackend
from kosmos2_ros.core.backends.torch.static import TorchStaticBackend
from kosmos2_ros.core.model.decoding import DecodingMode, Row, generate
from kosmos2_ros.core.model.loading import TextCodec, load_processor
from kosmos2_ros.core.model.reference import reference_generate
from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline
from kosmos2_ros.fixtures.checkpoints import EXPRESSIONS, build_toy_grounding_checkpoint, toy_image

EXTRA = ("the chair", "a man walking a dog", "the yellow chair on the left")


@pytest.fixture(scope="module")
def toy_dir(tiny_model_dir, tmp_path_factory):
    """A tiny checkpoint trained for seconds so that free decoding answers with boxes."""
    return build_toy_grounding_checkpoint(str(tiny_model_dir), str(tmp_path_factory.mktemp("toy")), steps=100)


@pytest.fixture(scope="module")
def toy(toy_dir, tmp_path_factory):
    processor = load_processor(str(toy_dir))
    art = tmp_path_factory.mktemp("toy_artifacts")
    return {"processor": processor, "codec": TextCodec(processor),
            "torch": TorchBackend(str(toy_dir), device="cpu"),
            "torch static": TorchStaticBackend(str(toy_dir), device="cpu"),
            "onnxruntime": OnnxBackend(str(toy_dir), device="cpu", artifacts_dir=str(art)), "art": art}


def _boxes(ids, vocab):
    """The box tokens of a well-formed answer `<object> p p (</delim/> p p)* </object>`, else None."""
    if not ids or ids[0] != vocab.object_open or vocab.object_close not in ids:
        return None
    body = ids[1:ids.index(vocab.object_close)]
    groups = [body[i:i + 3] for i in range(0, len(body), 3)]
    for g in groups:
        if len(g) < 2 or not (vocab.is_patch(g[0]) and vocab.is_patch(g[1])) or (len(g) == 3 and g[2] != vocab.delimiter):
            return None
    if len(groups[-1]) != 2:
        return None
    return [tuple(g[:2]) for g in groups]


@pytest.mark.parametrize("backend_name", ["torch", "torch static", "onnxruntime"])
def test_constrained_equals_free_whenever_free_is_well_formed(toy, backend_name):
    backend, codec = toy[backend_name], toy["codec"]
    vocab = codec.vocab
    ip = toy["processor"].image_processor
    well_formed = 0
    cases = 0
    for seed in range(6):
        pv = ip(images=toy_image(200 + seed, size=96 + 16 * seed), return_tensors="np")["pixel_values"]
        embeds = backend.encode_image(pv.astype(np.float32))
        for expr in EXPRESSIONS + EXTRA:
            p = codec.encode(f"<grounding><phrase> {expr}</phrase>")
            free = generate(backend, embeds, [Row(p.input_ids, p.image_mask, 12)], vocab)[0]
            cons = generate(backend, embeds, [Row(p.input_ids, p.image_mask, 12, constrained=True)], vocab)[0]
            cases += 1
            # Constrained output is always a well-formed box.
            assert _boxes(cons.token_ids, vocab) is not None and cons.stop_reason == "box"
            expected = _boxes(free.token_ids, vocab)
            if expected is None:
                continue
            well_formed += 1
            assert _boxes(cons.token_ids, vocab) == expected, (seed, expr)
            assert cons.model_calls < free.model_calls
            assert cons.forced[0] and cons.probs[0] == 1.0
    assert well_formed >= cases // 2   # the check above really ran on most cases


def test_constrained_budget_closes_the_box(toy):
    backend, codec = toy["torch"], toy["codec"]
    vocab = codec.vocab
    pv = toy["processor"].image_processor(images=toy_image(1), return_tensors="np")["pixel_values"]
    embeds = backend.encode_image(pv.astype(np.float32))
    p = codec.encode("<grounding><phrase> the red mug</phrase>")
    gen = generate(backend, embeds, [Row(p.input_ids, p.image_mask, 4, constrained=True)], vocab)[0]
    assert len(gen.token_ids) == 4 and gen.token_ids[0] == vocab.object_open
    assert gen.token_ids[-1] == vocab.object_close and all(vocab.is_patch(t) for t in gen.token_ids[1:3])
    # Prefill (its logits give the presence), the forced <object>'s step and one step; no room for
    # another box, so </object> is forced.
    assert gen.model_calls == 3 and gen.forced == [True, False, False, True]
    assert 0.0 <= gen.presence <= 1.0
    assert DecodingMode.parse(" Constrained ") is DecodingMode.CONSTRAINED
    with pytest.raises(ValueError):
        DecodingMode.parse("beam")


def _hf_generate(model, processor, expr, image, max_new):
    return reference_generate(model, processor, f"<grounding><phrase> {expr}</phrase>", image, max_new).new_ids


@pytest.mark.parametrize("backend_name", ["torch", "torch static", "onnxruntime"])
def test_batched_rows_equal_unbatched_transformers(toy, toy_dir, backend_name):
    """Four expressions about one frame in one run_batch: each equals generate for it alone."""
    from PIL import Image

    from kosmos2_ros.core.backends.modules import load_kosmos2

    model = load_kosmos2(str(toy_dir))
    processor = toy["processor"]
    vocab = toy["codec"].vocab
    for mode in ("free", "constrained"):
        cfg = Kosmos2Config(model=str(toy_dir), backend=backend_name.split()[0], device="cpu", decoding=mode,
                            max_new_tokens=10)
        pipe = Pipeline(cfg, toy[backend_name], processor)
        for seed in (0, 1):
            rgb = toy_image(300 + seed, size=128)
            exprs = [EXPRESSIONS[(seed + j) % len(EXPRESSIONS)] for j in range(3)] + [EXTRA[seed]]
            results = pipe.run_batch([Command(id=str(i), task="refer", text=e) for i, e in enumerate(exprs)],
                                     Frame(rgb=rgb, stamp_ns=seed + 1, frame_id="cam"))
            for expr, res in zip(exprs, results):
                assert res.status == 0, res.error
                ref = _hf_generate(model, processor, expr, Image.fromarray(rgb), 10)
                if mode == "free":
                    assert res.token_ids == ref, (expr, seed)
                elif _boxes(ref, vocab) is not None:
                    assert _boxes(res.token_ids, vocab) == _boxes(ref, vocab), (expr, seed)


def test_torch_decode_batch_equals_decode(toy):
    """Rows of different lengths in one torch forward: logits and caches as each row alone."""
    backend, codec = toy["torch"], toy["codec"]
    pv = toy["processor"].image_processor(images=toy_image(5), return_tensors="np")["pixel_values"]
    embeds = backend.encode_image(pv.astype(np.float32))
    caches, toks = [], []
    for text in ("<grounding><phrase> the cup</phrase>", "<grounding><phrase> a man walking a dog</phrase>",
                 "<grounding>An image of"):
        p = codec.encode(text)
        logits, cache = backend.prefill(embeds, p.input_ids, p.image_mask)
        caches.append(cache)
        toks.append(int(np.argmax(logits)))
    batched, new = backend.decode_batch([backend.fork(c) for c in caches], toks)
    assert len({c.length for c in caches}) == 3
    for c, t, row_logits, nc in zip(caches, toks, batched, new):
        single, sc = backend.decode(backend.fork(c), t)
        np.testing.assert_allclose(row_logits, single, atol=1e-5, rtol=0)
        assert nc.length == sc.length == c.length + 1
        for a, b in zip(nc.kv.layers, sc.kv.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)


def test_torch_prefill_batch_equals_prefill(toy):
    """Suffixes of different lengths on caches of different lengths in one torch forward: logits
    and caches as each row's own prefill, and the given caches untouched."""
    backend, codec = toy["torch"], toy["codec"]
    pv = toy["processor"].image_processor(images=toy_image(6), return_tensors="np")["pixel_values"]
    embeds = backend.encode_image(pv.astype(np.float32))
    head = codec.encode("<grounding><phrase> x</phrase>")
    split = head.input_ids.index(codec.vocab.grounding) + 1
    _, short = backend.prefill(embeds, head.input_ids[:split], head.image_mask[:split])
    longer = codec.encode("<grounding>An image of a dog and")
    _, longer_cache = backend.prefill(embeds, longer.input_ids, longer.image_mask)
    caches = [short, longer_cache, short]
    chunks = [codec.encode(t).input_ids[split:] for t in ("<grounding><phrase> the cup</phrase>",
                                                           "<grounding>x<phrase> a cat</phrase>",
                                                           "<grounding><phrase> a man walking a dog</phrase>")]
    before = [c.kv.layers[0].keys.clone() for c in caches]
    batched, new = backend.prefill_batch(caches, chunks)
    assert len({len(c) for c in chunks}) == 3 and len({c.length for c in caches}) == 2
    for c, k, chunk, row_logits, nc in zip(caches, before, chunks, batched, new):
        single, sc = backend.prefill(None, chunk, [0] * len(chunk), cache=c)
        np.testing.assert_allclose(row_logits, single, atol=1e-5, rtol=0)
        assert nc.length == sc.length == c.length + len(chunk)
        for a, b in zip(nc.kv.layers, sc.kv.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(c.kv.layers[0].keys, k, atol=0, rtol=0)


def test_token_prob_matches_a_float64_softmax():
    from kosmos2_ros.core.model.decoding import token_prob

    rng = np.random.RandomState(0)
    for scale in (0.1, 5.0, 60.0):
        z = (rng.randn(65037) * scale).astype(np.float32)
        ref = np.exp(z.astype(np.float64) - z.max())
        ref /= ref.sum()
        for tok in (int(np.argmax(z)), int(np.argmin(z)), 123):
            got = token_prob(z, tok)
            assert abs(got - ref[tok]) <= 1e-7
            if ref[tok] > 1e-30:   # below float32's range the probability underflows to 0
                assert abs(got - ref[tok]) <= 1e-5 * ref[tok]
    assert token_prob(np.array([0.0, 0.0], dtype=np.float32), 1) == 0.5
