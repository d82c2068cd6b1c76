"""onnxruntime backend over the exported graphs: same token ids as torch and as transformers."""
from __future__ import annotations

import numpy as np
import pytest

from kosmos2_ros.core.backends import create_backend
from kosmos2_ros.core.backends.onnx.backend import OnnxBackend
from kosmos2_ros.core.backends.torch.backend import TorchBackend
from kosmos2_ros.core.model.decoding import Row, generate
from kosmos2_ros.core.model.loading import TextCodec, load_processor
from kosmos2_ros.core.model.reference import reference_generate
from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline

PROMPTS = ("<grounding><phrase> the red mug</phrase>", "<grounding>An image of",
           "<grounding>Describe this image in detail:", "<grounding> Question: What is on the left? Answer:")
LOGITS_ATOL = 1e-4   # fp32 onnxruntime vs torch on CPU


@pytest.fixture(scope="module")
def backends(tiny_model_dir, tmp_path_factory):
    art = tmp_path_factory.mktemp("ort_artifacts")
    tb = TorchBackend(str(tiny_model_dir), device="cpu")
    ob = create_backend("onnxruntime", str(tiny_model_dir), device="cpu", artifacts_dir=str(art))
    assert isinstance(ob, OnnxBackend)
    return tb, ob, TextCodec(load_processor(str(tiny_model_dir))), art


def _pixels(seed):
    return np.random.RandomState(seed).randn(1, 3, 224, 224).astype(np.float32)


def _steps(backend, embeds, ids, mask, n):
    """Greedy tokens and each step's logits, one call at a time."""
    logits, cache = backend.prefill(embeds, ids, mask)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append((tok, logits))
        logits, cache = backend.decode(cache, tok)
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokens_and_logits_equal_torch(backends, prompt):
    tb, ob, codec, _ = backends
    pv = _pixels(len(prompt))
    et, eo = tb.encode_image(pv), ob.encode_image(pv)
    np.testing.assert_allclose(eo, et.numpy(), atol=1e-5, rtol=0)
    p = codec.encode(prompt)
    ref, got = _steps(tb, et, p.input_ids, p.image_mask, 10), _steps(ob, eo, p.input_ids, p.image_mask, 10)
    assert [t for t, _ in got] == [t for t, _ in ref]
    for (_, a), (_, b) in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=LOGITS_ATOL, rtol=0)


def _hf_generate(model, processor, prompt, image, max_new):
    return reference_generate(model, processor, prompt, image, max_new).new_ids


@pytest.fixture(scope="module")
def ort_pipeline(backends, tiny_model_dir):
    """(Pipeline on onnxruntime, a check that a result equals transformers' unbatched generate)."""
    from kosmos2_ros.core.backends.modules import load_kosmos2

    _, _, _, art = backends
    processor = load_processor(str(tiny_model_dir))
    model = load_kosmos2(str(tiny_model_dir))
    pipe = Pipeline.load(Kosmos2Config(model=str(tiny_model_dir), backend="onnxruntime", device="cpu",
                                       artifacts_dir=str(art), decoding="free", max_new_tokens=12))

    def assert_equals_generate(res, rgb) -> None:
        assert res.status == 0, res.error
        prompt = processor.tokenizer.decode(res.prompt_ids, skip_special_tokens=False)
        prompt = prompt[prompt.index("</image>") + len("</image>"):]
        assert res.token_ids == _hf_generate(model, processor, prompt, rgb, 12), res.id

    return pipe, assert_equals_generate


def test_pipeline_equals_transformers_generate(ort_pipeline):
    """Through Pipeline.load (prefix cache, batched suffixes): each prompt equals unbatched generate."""
    pipe, assert_equals_generate = ort_pipeline
    rgb = np.random.RandomState(3).randint(0, 255, (120, 160, 3)).astype(np.uint8)
    frame = Frame(rgb=rgb, stamp_ns=1, frame_id="cam")
    cmds = [Command(id="a", task="refer", text="the red mug"), Command(id="b", task="caption"),
            Command(id="c", task="refer", text="the laptop on the left"), Command(id="d", task="vqa", text="What is it?")]
    for res in pipe.run_batch(cmds, frame):
        assert_equals_generate(res, rgb)


def test_decode_batch_equals_unbatched(backends):
    tb, ob, codec, _ = backends
    pv = _pixels(7)
    eo = ob.encode_image(pv)
    texts = ("<grounding><phrase> the cup</phrase>", "<grounding><phrase> a man walking a dog</phrase>",
             "<grounding>An image of")
    rows = [codec.encode(t) for t in texts]
    alone = [generate(ob, eo, [Row(p.input_ids, p.image_mask, 8)], codec.vocab)[0].token_ids for p in rows]
    together = generate(ob, eo, [Row(p.input_ids, p.image_mask, 8) for p in rows], codec.vocab)
    assert [g.token_ids for g in together] == alone
    # Different past lengths packed into one call: logits as each row alone.
    caches, logits = [], []
    for p in rows:
        lg, c = ob.prefill(eo, p.input_ids, p.image_mask)
        caches.append(c)
        logits.append(lg)
    toks = [int(np.argmax(lg)) for lg in logits]
    batched, new = ob.decode_batch([ob.fork(c) for c in caches], toks)
    for c, t, row_logits, nc in zip(caches, toks, batched, new):
        single, sc = ob.decode(c, t)
        np.testing.assert_allclose(row_logits, single, atol=1e-5, rtol=0)
        assert nc.length == sc.length == c.length + 1
        for j in range(nc.n_arrays()):
            np.testing.assert_allclose(nc.layer(j), sc.layer(j), atol=1e-5, rtol=0)


def test_prefill_batch_equals_prefill(backends):
    tb, ob, codec, _ = backends
    eo = ob.encode_image(_pixels(9))
    p = codec.encode("<grounding><phrase> x</phrase>")
    split = p.input_ids.index(codec.vocab.grounding) + 1
    _, prefix = ob.prefill(eo, p.input_ids[:split], p.image_mask[:split])
    chunks = [codec.encode(t).input_ids[split:] for t in ("<grounding><phrase> the cup</phrase>",
                                                           "<grounding><phrase> the blue box on the left</phrase>")]
    logits, caches = ob.prefill_batch([prefix, prefix], chunks)
    _, tprefix = tb.prefill(tb.encode_image(_pixels(9)), p.input_ids[:split], p.image_mask[:split])
    for chunk, lg, c in zip(chunks, logits, caches):
        single, _ = ob.prefill(None, chunk, [0] * len(chunk), cache=prefix)
        ref, _ = tb.prefill(None, chunk, [0] * len(chunk), cache=tb.fork(tprefix))
        np.testing.assert_allclose(lg, single, atol=1e-5, rtol=0)
        np.testing.assert_allclose(lg, ref, atol=LOGITS_ATOL, rtol=0)
        assert c.length == split + len(chunk)
    assert prefix.length == split   # the shared prefix is untouched


def test_fp16_refused_with_reason(tiny_model_dir, tmp_path):
    from kosmos2_ros.core.backends.base import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="tensorrt"):
        OnnxBackend(str(tiny_model_dir), device="cpu", precision="fp16", artifacts_dir=str(tmp_path))


def test_lone_commands_equal_transformers_generate(ort_pipeline):
    """One command at a time on a frame (the first prefills whole and keeps the prefix, the next
    reuse it): each equals unbatched generate."""
    pipe, assert_equals_generate = ort_pipeline
    rgb = np.random.RandomState(5).randint(0, 255, (97, 131, 3)).astype(np.uint8)
    frame = Frame(rgb=rgb, stamp_ns=2, frame_id="cam")
    for cmd in (Command(id="a", task="refer", text="a red square"), Command(id="b", task="refer", text="a blue square"),
                Command(id="c", task="caption")):
        assert_equals_generate(pipe.run(cmd, frame), rgb)
    assert len(frame.encoding.prefix_caches) == 1   # the shared head was kept once and reused


def test_decoding_past_the_arena_capacity_stays_equal(backends):
    """Greedy steps beyond the first arena's capacity (rows move to a larger arena mid-decode):
    tokens and logits still equal torch's at every step."""
    from kosmos2_ros.core.backends.kv_cache import capacity_for

    tb, ob, codec, _ = backends
    pv = _pixels(11)
    p = codec.encode("<grounding>An image of")
    first = capacity_for(len(p.input_ids), 4096)
    n = first - len(p.input_ids) + 6
    ref = _steps(tb, tb.encode_image(pv), p.input_ids, p.image_mask, n)
    got = _steps(ob, ob.encode_image(pv), p.input_ids, p.image_mask, n)
    assert [t for t, _ in got] == [t for t, _ in ref]
    for (_, a), (_, b) in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=LOGITS_ATOL, rtol=0)
    assert len(p.input_ids) + n > first
