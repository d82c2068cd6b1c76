"""torch's static path (`backends.torch.static`) on the CPU: the hand-written decoder over a static
KV arena gives the token ids transformers' `generate` gives, with rows batched, batches split to a
call limit, long prompts prefilled in pieces, and no allocation per decoded token.

The CUDA-graph capture of its decode step needs a GPU: `bench/device_check.py` runs it there (the
arithmetic it replays is what runs here, on the same buffers).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kosmos2_ros.core.backends import registry
from kosmos2_ros.core.backends.torch.backend import TorchBackend, create
from kosmos2_ros.core.backends.torch.static import TorchStaticBackend
from kosmos2_ros.core.model.decoding import Row, generate
from kosmos2_ros.core.model.loading import TextCodec, load_processor
from kosmos2_ros.core.model.reference import reference_generate
from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline
from kosmos2_ros.fixtures.checkpoints import EXPRESSIONS, toy_image

PROMPTS = ("<grounding><phrase> the red mug</phrase>", "<grounding>An image of",
           "<grounding> Question: what is on the left? Answer:", "<grounding>Describe this image in detail:")


@pytest.fixture(scope="module")
def static(tiny_model_dir):
    backend = TorchStaticBackend(str(tiny_model_dir), device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def codec(tiny_model_dir):
    return TextCodec(load_processor(str(tiny_model_dir)))


def _pixels(tiny_model_dir, seed):
    processor = load_processor(str(tiny_model_dir))
    return processor.image_processor(images=toy_image(seed, size=128), return_tensors="np")["pixel_values"] \
        .astype(np.float32)


def test_pipeline_tokens_equal_transformers_generate(tiny_model_dir, static):
    """Every task's prompt through the pipeline (free decoding, the checkpoint's n-gram setting
    passed to generate explicitly) and constrained referring expressions, on two frames."""
    from kosmos2_ros.core.backends.modules import load_kosmos2

    processor = load_processor(str(tiny_model_dir))
    model = load_kosmos2(str(tiny_model_dir))
    pipe = Pipeline(Kosmos2Config(model=str(tiny_model_dir), backend="torch", device="cpu", decoding="free",
                                  max_new_tokens=12, enable_3d=False), static, processor)
    for seed in (0, 1):
        rgb = toy_image(40 + seed, size=128)
        frame = Frame(rgb=rgb, stamp_ns=seed + 1, frame_id="cam")
        commands = {f"<grounding><phrase> {EXPRESSIONS[seed]}</phrase>": Command(id="r", task="refer",
                                                                                 text=EXPRESSIONS[seed]),
                    "<grounding>An image of": Command(id="c", task="caption"),
                    "<grounding> Question: what is on the left? Answer:": Command(id="q", task="vqa",
                                                                                   text="what is on the left?")}
        for (prompt, cmd), res in zip(commands.items(), pipe.run_batch(list(commands.values()), frame)):
            assert res.status == 0, res.error
            assert res.token_ids == reference_generate(model, processor, prompt, rgb, 12).new_ids, (cmd.task, seed)


def test_rows_and_long_prompts_split_to_a_call_limit(tiny_model_dir, codec):
    """With at most 2 rows and 16 tokens a call (an engine profile's limits, here on the static path):
    five rows decode in groups on their own arenas, and each ~75-token prompt (64 image positions)
    is prefilled in pieces that carry the image embeddings they need; tokens equal the reference's."""
    ref = TorchBackend(str(tiny_model_dir), device="cpu")
    limited = TorchStaticBackend(str(tiny_model_dir), device="cpu")
    limited.max_rows, limited.max_chunk = 2, 16
    pv = _pixels(tiny_model_dir, 3)
    rows = [Row(codec.encode(p).input_ids, codec.encode(p).image_mask, n)
            for p, n in zip(PROMPTS + PROMPTS[:1], (10, 6, 9, 12, 3))]
    assert all(len(r.input_ids) > 16 for r in rows)
    want = [g.token_ids for g in generate(ref, ref.encode_image(pv), rows, codec.vocab)]
    got = [g.token_ids for g in generate(limited, limited.encode_image(pv), rows, codec.vocab)]
    assert got == want and len({len(t) for t in want}) > 1
    assert {k[0] for k in limited._arenas._arenas} == {0, 1, 2}    # three groups, three arena slots
    ref.close()
    limited.close()


def test_decode_steps_allocate_nothing(static, codec, tiny_model_dir):
    """Steps write one column of one arena in place: the arena and the step's buffers stay the same objects."""
    embeds = static.encode_image(_pixels(tiny_model_dir, 4))
    p = codec.encode(PROMPTS[1])
    logits, cache = static.prefill(embeds, p.input_ids, p.image_mask)
    logits, cache = static.decode(cache, int(np.argmax(logits)))
    arena, step = cache.arena, static._steps[id(cache.arena)]
    address = arena.kv.data_ptr()
    for _ in range(6):
        logits, cache = static.decode(cache, int(np.argmax(logits)))
        assert cache.arena is arena and static._steps[id(arena)] is step and arena.kv.data_ptr() == address
    assert cache.length == len(p.input_ids) + 7


def test_batched_images_equal_one_by_one(static, codec, tiny_model_dir):
    """Frames of several cameras: one vision call and one head prefill for all, as each alone."""
    pixels = [_pixels(tiny_model_dir, s) for s in (5, 6, 7)]
    together = static.encode_images(pixels)
    p = codec.encode(PROMPTS[0])
    caches = static.prefill_images(together, p.input_ids, p.image_mask)
    for pv, emb, cache in zip(pixels, together, caches):
        alone = static.encode_image(pv)
        np.testing.assert_allclose(emb.numpy(), alone.numpy(), atol=1e-5, rtol=0)
        _, own = static.prefill(alone, p.input_ids, p.image_mask)
        for j in range(cache.n_arrays()):
            np.testing.assert_allclose(cache.layer(j).numpy(), own.layer(j).numpy(), atol=1e-5, rtol=0)


def test_torch_mode_picks_the_path(tiny_model_dir):
    """auto: the reference on the CPU (static on a GPU); static and reference on request; a bad mode refused."""
    assert isinstance(create(str(tiny_model_dir), device="cpu"), TorchBackend)
    backend = registry.create_backend("torch", str(tiny_model_dir), device="cpu", torch_mode="static")
    assert isinstance(backend, TorchStaticBackend) and backend.precision == "fp32" and not backend.cuda_graph
    backend.close()
    with pytest.raises(ValueError, match="torch_mode must be one of auto, reference, static"):
        create(str(tiny_model_dir), device="cpu", torch_mode="fast")


class CountingCapture:
    """Stands in for CUDA graph capture on the CPU: counts captures; a replay runs the captured launch again."""

    def __init__(self) -> None:
        self.captures = 0
        self.fresh_pools = 0

    def capture(self, launch, fresh_pool: bool):
        self.fresh_pools += fresh_pool
        launch()
        self.captures += 1
        return type("Graph", (), {"replay": staticmethod(launch)})()


def test_mixed_traffic_captures_nothing_after_warm_up(tiny_model_dir):
    """200 commands of a node's real mix (a lone refer with candidates, four refers on one frame, a caption, a
    description, a refer whose ambiguous boxes are described), each round on a new frame: the arena pool keeps
    every shape the mix uses, so after two rounds no step is captured again and every step replays; tokens
    equal a backend that never captures."""
    processor = load_processor(str(tiny_model_dir))
    logged = []
    graphs = TorchStaticBackend(str(tiny_model_dir), device="cpu")
    graphs._arenas._on_change = logged.append
    counter = CountingCapture()
    graphs._graph_capture = counter
    graphs.set_cuda_graph(True)
    plain = TorchStaticBackend(str(tiny_model_dir), device="cpu")
    config = Kosmos2Config(model=str(tiny_model_dir), backend="torch", device="cpu", enable_3d=False)
    pipes = [Pipeline(config, b, processor) for b in (graphs, plain)]

    def round_of(seed: int):
        frame = Frame(rgb=toy_image(100 + seed, size=128), stamp_ns=seed + 1, frame_id="cam")
        lone = Command(id="r", task="refer", text=EXPRESSIONS[seed % len(EXPRESSIONS)])
        four = [Command(id=f"m{i}", task="refer", text=EXPRESSIONS[(seed + i) % len(EXPRESSIONS)]) for i in range(4)]
        rest = [Command(id="c", task="caption"), Command(id="d", task="describe", max_new_tokens=24),
                Command(id="a", task="refer", text=EXPRESSIONS[(seed + 1) % len(EXPRESSIONS)], describe_candidates=1)]
        out = []
        for pipe in pipes:
            results = [pipe.run(lone, frame)] + pipe.run_batch(four, frame) + [pipe.run(c, frame) for c in rest]
            assert all(r.status == 0 for r in results), [r.error for r in results]
            out.append([r.token_ids for r in results])
        assert out[0] == out[1]
        return len(out[0])

    commands = sum(round_of(seed) for seed in range(2))
    warm = (counter.captures, graphs.graph_stats.plain_steps, graphs.graph_stats.step_buffers)
    while commands < 200:
        commands += round_of(commands)
    stats = graphs.graph_stats
    assert (counter.captures, stats.plain_steps, stats.step_buffers) == warm, "captures after warm-up"
    assert stats.captures == counter.captures >= 3 and stats.replays > 10 * stats.plain_steps
    assert counter.fresh_pools == 1                          # every graph joined the first one's pool
    assert graphs._arenas.stats.dropped == 0 and graphs._arenas.stats.kept == len(graphs._steps)
    assert logged and all("kept" in line and "MiB" in line for line in logged)
    graphs.close()
    plain.close()


def test_reduced_precision_is_read_once_in_its_dtype_and_computes_what_the_cast_model_does(tiny_model_dir):
    """bf16 here (fp16 on a GPU takes the same path): the checkpoint read in bf16, its fp32 islands read again
    in fp32, gives exactly the modules that reading fp32 and casting gave (every weight, every dtype), with
    the input embedding and lm_head still one tensor where the checkpoint ties them."""
    from kosmos2_ros.core.backends.torch.backend import load_model

    direct = TorchStaticBackend(str(tiny_model_dir), device="cpu", precision="bf16")
    fp32 = load_model(str(tiny_model_dir), "fp32", False)
    tied = fp32.text_model.lm_head.weight is fp32.text_model.model.embed_tokens.weight
    cast = TorchStaticBackend(str(tiny_model_dir), device="cpu", precision="bf16", model=fp32)
    pad = int(fp32.config.text_config.pad_token_id)
    for mine, theirs in ((direct._decoder, cast._decoder), (direct._vision, cast._vision)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        for name in a:
            x, y = a[name], b[name]
            if name in ("embed_tokens.weight", "lm_head.weight") and not torch.equal(x, y):
                # transformers 5.0-5.14 zero the padding row when they load (a pad token is never attended);
                # the file's row is what is read here. Every other row is the same.
                assert not y[pad].any()
                x, y = torch.cat([x[:pad], x[pad + 1:]]), torch.cat([y[:pad], y[pad + 1:]])
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert any(p.dtype == torch.float32 for p in direct._decoder.parameters())      # the LayerNorms
    assert (direct._decoder.lm_head.weight is direct._decoder.embed_tokens.weight) == tied
    direct.close()
    cast.close()


def test_a_truncated_checkpoint_is_refused_with_the_reason(tiny_model_dir, tmp_path):
    """The plain-read loader checks what the file says against what it holds."""
    import shutil

    from kosmos2_ros.core.backends.base import BackendUnavailable

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4096])
    with pytest.raises(BackendUnavailable, match="file ends inside a tensor"):
        TorchStaticBackend(str(broken), device="cpu", precision="bf16")
