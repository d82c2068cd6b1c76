"""Decoding as the authors ran it: the checkpoint's no_repeat_ngram_size, applied in the shared loop.

A tiny checkpoint saved with `no_repeat_ngram_size: 3` in its generation config (as
microsoft/kosmos-2-patch14-224 ships) whose greedy output repeats itself without it: every task,
on torch and onnxruntime, must give the ids of `generate(..., no_repeat_ngram_size=3)`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest
import torch
from PIL import Image

from kosmos2_ros.core.model.decoding import NoRepeatNGram, Row, choose, generate, logits_processors
from kosmos2_ros.core.model.loading import checkpoint_no_repeat_ngram_size
from kosmos2_ros.core.model.reference import reference_generate
from kosmos2_ros.core.model.tasks import Task, TaskRequest, build_prompts
from kosmos2_ros.core.serving.config import ConfigError, Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline, Status
from kosmos2_ros.fixtures.scenes import draw_scene

MAX_NEW = 24
TASKS = [
    ("refer", "a red square", None),
    ("phrase_grounding", "a man with [a red square] and [a blue square]", None),
    ("caption", "", None),
    ("describe", "", None),
    ("region", "", (40.0, 30.0, 150.0, 120.0)),
    ("vqa", "What is on the table?", None),
    ("raw", "An image of a dog and", None),
]


def repeated_trigrams(ids: List[int]) -> int:
    grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
    return len(grams) - len(set(grams))


@pytest.fixture(scope="module")
def ngram_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random (sharpened) weights, so greedy decoding loops; generation config sets 3 like the real one."""
    from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ngram3"), train=False, no_repeat_ngram_size=3)


@pytest.fixture(scope="module")
def reference_model(ngram_dir: Path) -> Any:
    from transformers import AutoProcessor

    from kosmos2_ros.core.backends.modules import load_kosmos2

    return (load_kosmos2(str(ngram_dir)),
            AutoProcessor.from_pretrained(str(ngram_dir)))


# -- the processor itself ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_no_repeat_ngram_bans_what_transformers_bans(size: int) -> None:
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    rng = np.random.default_rng(size)
    theirs = NoRepeatNGramLogitsProcessor(size)
    for length in list(range(0, 8)) + [20, 60]:
        ids = rng.integers(0, 6, size=length).tolist()   # a small vocabulary, so n-grams recur
        logits = rng.standard_normal(9).astype(np.float32)
        ours = NoRepeatNGram(size)(ids, logits)
        ref = theirs(torch.tensor([ids], dtype=torch.long), torch.from_numpy(logits.copy())[None])[0].numpy()
        np.testing.assert_array_equal(ours, ref)
        assert np.isfinite(logits).all()   # the input logits are never edited


def test_banned_tokens_on_hand_made_sequences() -> None:
    proc = NoRepeatNGram(3)
    assert proc.banned([5, 6, 7, 5, 6]).tolist() == [7]
    assert proc.banned([5, 6, 7, 5, 6, 8, 5, 6]).tolist() == [7, 8]
    assert proc.banned([5, 6]).tolist() == []           # no complete trigram yet
    assert proc.banned([6, 6, 6]).tolist() == [6]
    assert logits_processors(0) == ()
    assert [p.size for p in logits_processors(3)] == [3]
    with pytest.raises(ValueError):
        NoRepeatNGram(0)


def test_choose_skips_a_banned_allowed_token_for_the_next_best() -> None:
    logits = np.array([0.0, 5.0, 4.0, 3.0, 9.0], dtype=np.float32)
    allowed = np.array([1, 2, 3])
    procs = logits_processors(2)
    assert choose(logits, [1], (), allowed) == 1
    assert choose(logits, [1, 1], procs, allowed) == 2            # (1, 1) seen: 1 after 1 banned
    assert choose(logits, [1, 2, 1, 3, 1], procs, allowed) == 1   # 2 and 3 banned, 1 not
    assert choose(logits, [1, 1, 2, 1, 3, 1], procs, allowed) == 1   # all allowed banned: the grammar wins
    assert choose(logits, [4, 4], procs, None) == 1               # free: 4 banned, next best over everything


# -- where the value comes from ------------------------------------------------------------------

def test_value_comes_from_the_checkpoint_and_can_be_overridden(ngram_dir: Path, tiny_untrained_dir: Path) -> None:
    assert checkpoint_no_repeat_ngram_size(str(ngram_dir)) == 3
    assert checkpoint_no_repeat_ngram_size(str(tiny_untrained_dir)) == 0
    pipe = Pipeline.load(Kosmos2Config(model=str(ngram_dir), backend="torch", device="cpu", allow_download=False))
    assert pipe.no_repeat_ngram_size() == 3
    assert pipe.no_repeat_ngram_size(Command(no_repeat_ngram_size=0)) == 0
    assert pipe.no_repeat_ngram_size(Command(no_repeat_ngram_size=2)) == 2
    pipe.config = pipe.config.with_changes({"no_repeat_ngram_size": 0})
    assert pipe.no_repeat_ngram_size() == 0 and pipe.no_repeat_ngram_size(Command(no_repeat_ngram_size=4)) == 4
    frame = Frame(rgb=np.zeros((40, 60, 3), np.uint8))
    bad = pipe.run(Command(id="x", task="caption", no_repeat_ngram_size=-5), frame)
    assert bad.status == Status.INVALID and "no_repeat_ngram_size" in bad.error
    for value in (-2, 65, "3"):
        with pytest.raises(ConfigError):
            Kosmos2Config(no_repeat_ngram_size=value)
    assert Kosmos2Config.from_dict({"no_repeat_ngram_size": "2"}).no_repeat_ngram_size == 2


def test_malformed_generation_config_is_one_clear_error(ngram_dir: Path, tmp_path: Path) -> None:
    from kosmos2_ros.core.model.loading import ModelNotFound

    bad = tmp_path / "bad"
    shutil.copytree(ngram_dir, bad)
    (bad / "generation_config.json").write_text(json.dumps({"no_repeat_ngram_size": "three"}))
    with pytest.raises(ModelNotFound, match="no_repeat_ngram_size must be a non-negative integer"):
        checkpoint_no_repeat_ngram_size(str(bad))


# -- equality with transformers' generate(..., no_repeat_ngram_size=3) ---------------------------

@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def ngram_pipeline(request: pytest.FixtureRequest, ngram_dir: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    art = tmp_path_factory.mktemp("ngram_artifacts")
    return Pipeline.load(Kosmos2Config(model=str(ngram_dir), backend=request.param, device="cpu", decoding="free",
                                       artifacts_dir=str(art), allow_download=False, max_new_tokens=MAX_NEW))


def test_every_task_equals_generate_with_the_checkpoints_ngram_size(ngram_pipeline: Pipeline,
                                                                   reference_model: Any) -> None:
    model, processor = reference_model
    rgb, _ = draw_scene(200, 160, np.random.default_rng(3))
    frame = Frame(rgb=rgb, stamp_ns=1, frame_id="cam")
    commands = [Command(id=t, task=t, text=text, region_px=region) for t, text, region in TASKS]
    # Batched (shared prefix, rows decoded together) and one by one.
    results = ngram_pipeline.run_batch(commands, frame)
    results += [ngram_pipeline.run(c, Frame(rgb=rgb, stamp_ns=2, frame_id="cam")) for c in commands]
    geometry = ngram_pipeline.encode(frame).geometry
    for res, (task, text, region) in zip(results, TASKS + TASKS):
        assert res.status == Status.OK, res.error
        assert res.no_repeat_ngram_size == 3 and res.to_json()["no_repeat_ngram_size"] == 3
        region_norm = geometry.to_normalized(region) if region else None
        with_ngram, without = [], []
        for prompt in build_prompts(TaskRequest(Task(task), text, region_norm)):
            ref = reference_generate(model, processor, prompt.text, rgb, MAX_NEW, bboxes=prompt.bboxes)
            with_ngram += ref.new_ids
            without.append(reference_generate(model, processor, prompt.text, rgb, MAX_NEW, bboxes=prompt.bboxes,
                                              no_repeat_ngram_size=0).new_ids)
        assert res.token_ids == with_ngram, task
        # The setting matters here: without it this checkpoint repeats itself.
        assert any(repeated_trigrams(ids) for ids in without), task
        assert res.token_ids != sum(without, []), task


def test_questions_about_a_region_and_checks_on_every_backend(ngram_pipeline: Pipeline, reference_model: Any) -> None:
    """vqa and check about a region give generate's tokens on this backend, and check's answer_probability is
    p(yes) / (p(yes) + p(no)) from an independent float64 softmax over the reference model's own logits."""
    model, processor = reference_model
    rgb, _ = draw_scene(200, 160, np.random.default_rng(5))
    frame = Frame(rgb=rgb, stamp_ns=1, frame_id="cam")
    region = (40.0, 30.0, 150.0, 120.0)
    cases = [("vqa", "What is [this] used for?", region), ("check", "Is [this] a red square?", region),
             ("check", "Is there a dog?", None)]
    results = ngram_pipeline.run_batch([Command(id=f"q{k}", task=t, text=x, region_px=r)
                                        for k, (t, x, r) in enumerate(cases)], frame)
    geometry = ngram_pipeline.encode(frame).geometry
    vocab = ngram_pipeline.vocab
    for res, (task, text, box) in zip(results, cases):
        assert res.status == Status.OK, res.error
        (prompt,) = build_prompts(TaskRequest(Task(task), text, geometry.to_normalized(box) if box else None))
        ref = reference_generate(model, processor, prompt.text, rgb, MAX_NEW, bboxes=prompt.bboxes)
        assert res.token_ids == ref.new_ids, task
        if task != "check":
            assert res.answer_probability == -1.0
            continue
        inputs = processor(text=prompt.text, images=Image.fromarray(rgb), bboxes=prompt.bboxes, return_tensors="pt")
        with torch.inference_mode():
            logits = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                           attention_mask=inputs["attention_mask"],
                           image_embeds_position_mask=inputs["image_embeds_position_mask"]).logits[0, -1]
        p = torch.softmax(logits.double(), dim=-1)
        p_yes, p_no = float(p[list(vocab.yes_tokens)].sum()), float(p[list(vocab.no_tokens)].sum())
        assert res.answer_probability == pytest.approx(p_yes / (p_yes + p_no), rel=1e-4, abs=1e-6), task


def test_constrained_box_skips_a_banned_location_for_the_next_best(ngram_pipeline: Pipeline) -> None:
    """A prompt that already holds the phrase's box: the repeated first location is banned."""
    pipe = ngram_pipeline
    vocab, codec, backend = pipe.vocab, pipe.codec, pipe.backend
    rgb, _ = draw_scene(200, 160, np.random.default_rng(4))
    embeds = pipe.encode(Frame(rgb=rgb)).image_embeds
    locations = np.arange(*vocab.patch_ids())

    def ranked(text: str) -> np.ndarray:
        """Location tokens by the model's logits after `text<object>`, best first (computed here)."""
        p = codec.encode(text)
        logits, _ = backend.prefill(embeds, p.input_ids + [vocab.object_open], p.image_mask + [0])
        return locations[np.argsort(-logits[locations], kind="stable")]

    def holding(x_tok: int) -> str:
        loc = codec.tokenizer.convert_ids_to_tokens(int(x_tok))
        return f"<grounding><phrase> a red square</phrase><object>{loc}{loc}</object> and<phrase> a red square</phrase>"

    # Find a prompt whose box starts where the model's answer would: the answer repeats `</phrase><object> x`.
    x_tok = ranked("<grounding><phrase> a red square</phrase>")[0]
    for _ in range(20):
        order = ranked(holding(x_tok))
        if order[0] == x_tok:
            break
        x_tok = order[0]
    assert order[0] == x_tok, "no prompt found whose box the model repeats"
    p = codec.encode(holding(x_tok))
    plain, banned = (generate(backend, embeds, [Row(p.input_ids, p.image_mask, 4, constrained=True,
                                                    processors=logits_processors(n))], vocab)[0] for n in (0, 3))
    assert plain.token_ids[1] == x_tok
    # `</phrase> <object> x` is already in the prompt, so x is banned: the next best location wins.
    assert banned.token_ids[1] == order[1] != x_tok
    assert banned.stop_reason == "box" and all(vocab.is_patch(t) for t in banned.token_ids[1:3])


def test_cli_reports_the_value_and_takes_an_override(ngram_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "scene.png"
    Image.fromarray(draw_scene(120, 90, np.random.default_rng(1))[0]).save(image)
    base = [sys.executable, "-m", "kosmos2_ros.cli", "--model", str(ngram_dir), "--image", str(image),
            "--task", "caption", "--max-new-tokens", "8", "--no-download", "--device", "cpu", "--json"]
    for extra, expected in (([], 3), (["--no-repeat-ngram-size", "0"], 0)):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["no_repeat_ngram_size"] == expected
    proc = subprocess.run(base + ["--no-repeat-ngram-size", "-4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no_repeat_ngram_size" in proc.stderr
