"""Commands about several frames batched together, and frames encoded ahead (issue 12).

Batching across frames (one vision batch, one head prefill batch, rows decoded together)
and encoding ahead are optimisations: they are proven by token ids equal to transformers'
unbatched `generate` for every command, and equal to the pipeline without them.
"""
from __future__ import annotations

from typing import Any, List

import numpy as np
import pytest

from kosmos2_ros.core.model.reference import reference_generate
from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline, Status
from kosmos2_ros.fixtures.scenes import draw_scene

MAX_NEW = 16


@pytest.fixture(scope="module", params=["torch", "torch static", "onnxruntime"])
def setup(request: Any, tiny_model_dir: Any, tmp_path_factory: Any) -> Any:
    """A pipeline on each backend that batches across frames, with transformers' model beside it
    ("torch static": the torch backend's static path, what it runs on a GPU, here on the CPU)."""
    from transformers import AutoProcessor

    from kosmos2_ros.core.backends.modules import load_kosmos2

    backend, _, mode = request.param.partition(" ")
    pipe = Pipeline.load(Kosmos2Config(model=str(tiny_model_dir), backend=backend, device="cpu",
                                       decoding="free", allow_download=False, torch_mode=mode or "auto",
                                       artifacts_dir=str(tmp_path_factory.mktemp("artifacts"))))
    model = load_kosmos2(str(tiny_model_dir))
    processor = AutoProcessor.from_pretrained(str(tiny_model_dir))
    images = [draw_scene(320 + 16 * i, 240, np.random.default_rng(10 + i), count=3)[0] for i in range(3)]
    return pipe, model, processor, images


def frames_of(images: List[np.ndarray]) -> List[Frame]:
    return [Frame(rgb=img.copy(), stamp_ns=100 + i, frame_id=f"cam{i}") for i, img in enumerate(images)]


def test_run_frames_equals_unbatched_generate(setup: Any) -> None:
    pipe, model, processor, images = setup
    texts = [["a red square", "a blue circle"], ["a green triangle"], ["the left"]]
    items = [(frame, [Command(id=f"{f}{i}", text=t, max_new_tokens=MAX_NEW, camera=f"c{f}")
                      for i, t in enumerate(texts[f])]) for f, frame in enumerate(frames_of(images))]
    out = pipe.run_frames(items)
    for f, ((frame, cmds), results) in enumerate(zip(items, out)):
        for cmd, res in zip(cmds, results):
            assert res.status is Status.OK, res.error
            assert (res.camera, res.stamp_ns, res.frame_id) == (f"c{f}", frame.stamp_ns, frame.frame_id)
            ref = reference_generate(model, processor, f"<grounding><phrase> {cmd.text}</phrase>", images[f], MAX_NEW)
            assert res.token_ids == ref.new_ids


def test_run_frames_mixed_tasks_equal_single_runs(setup: Any) -> None:
    pipe, _, _, images = setup
    commands = [[Command(task="caption", max_new_tokens=10), Command(task="refer", text="", max_new_tokens=8)],
                [Command(task="vqa", text="Where is the square?", max_new_tokens=10, decoding="constrained")],
                [Command(task="refer", text="a red square", max_new_tokens=12, decoding="constrained")]]
    batched = pipe.run_frames(list(zip(frames_of(images), commands)))
    for f, (cmds, results) in enumerate(zip(commands, batched)):
        for cmd, res in zip(cmds, results):
            alone = pipe.run(cmd, frames_of(images)[f])
            assert (res.status, res.token_ids, res.text) == (alone.status, alone.token_ids, alone.text)
    assert batched[0][1].status is Status.INVALID


def test_batched_backend_calls_equal_single_calls(setup: Any) -> None:
    pipe, _, _, images = setup
    frames = frames_of(images)
    pipe.encode_frames(frames)
    singles = [pipe.backend.encode_image(f.encoding.pixel_values) for f in frames]
    for f, single in zip(frames, singles):
        np.testing.assert_allclose(np.asarray(f.encoding.image_embeds), np.asarray(single), atol=1e-5)
    head = pipe.grounding_head()
    mask = pipe.codec.encode("<grounding><phrase> x</phrase>").image_mask[:len(head)]
    caches = pipe.backend.prefill_images([f.encoding.image_embeds for f in frames], head, mask)
    for f, cache in zip(frames, caches):
        logits_b, _ = pipe.backend.prefill(None, [7], [0], cache=cache)
        _, alone = pipe.backend.prefill(f.encoding.image_embeds, head, mask)
        logits_a, _ = pipe.backend.prefill(None, [7], [0], cache=alone)
        np.testing.assert_allclose(logits_b, logits_a, atol=1e-4)


def test_encode_ahead_gives_the_same_tokens_and_skips_the_encoding(setup: Any) -> None:
    pipe, _, _, images = setup
    ahead, cold = frames_of(images), frames_of(images)
    assert pipe.encode_ahead(ahead) == len(ahead)
    assert pipe.encode_ahead(ahead) == 0          # already done: nothing twice
    for frame_a, frame_c in zip(ahead, cold):
        for text in ("a red square", "a green triangle"):
            cmd = Command(text=text, max_new_tokens=MAX_NEW, decoding="constrained")
            warm, plain = pipe.run(cmd, frame_a), pipe.run(cmd, frame_c)
            assert warm.status is Status.OK and warm.token_ids == plain.token_ids
            assert warm.timings_ms["encode"] == 0.0
