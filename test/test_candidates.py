"""Is it there, and which one: presence, candidate boxes and the ambiguity flag (`core/model/decoding.py`,
`core/serving/pipeline.py`), on crafted logits and on real backends with the tiny checkpoint."""
from __future__ import annotations

import numpy as np
import pytest

from kosmos2_ros.core.backends.onnx.backend import OnnxBackend
from kosmos2_ros.core.backends.torch.backend import TorchBackend
from kosmos2_ros.core.backends.torch.static import TorchStaticBackend
from kosmos2_ros.core.model.decoding import Row, best_second, candidate_cells, generate, token_prob
from kosmos2_ros.core.model.loading import TextCodec, load_processor
from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline, described_as
from kosmos2_ros.fixtures.checkpoints import WHICH_ONE_TEST_IMAGES
from kosmos2_ros.fixtures.scenes import draw_scene


@pytest.fixture(scope="module")
def codec(tiny_model_dir):
    return TextCodec(load_processor(str(tiny_model_dir)))


def _logits(vocab, cells, size=None):
    """Logits with the given {cell: value} over the location tokens, everything else far below."""
    z = np.full(size or vocab.patch_ids()[1] + 10, -30.0, dtype=np.float32)
    lo = vocab.patch_ids()[0]
    for cell, value in cells.items():
        z[lo + cell] = value
    return z


def test_neighbouring_cells_are_suppressed_and_the_best_others_kept_in_order(codec):
    v = codec.vocab
    lo = v.patch_ids()[0]
    chosen = 5 * 32 + 5
    z = _logits(v, {chosen: 9.0, chosen + 1: 8.9, chosen + 33: 8.8,     # the same object's neighbours
                    10 * 32 + 20: 8.0, 10 * 32 + 21: 7.9,               # another object, and its neighbour
                    30 * 32 + 2: 7.0, 0: 6.0})
    got = candidate_cells(z, lo + chosen, v, count=5)
    cells = [t - lo for t, _ in got]
    assert len(cells) == 5
    assert cells[:3] == [10 * 32 + 20, 30 * 32 + 2, 0]
    probs = [p for _, p in got]
    assert probs == sorted(probs, reverse=True) and abs(probs[0] - token_prob(z, lo + 10 * 32 + 20)) < 1e-6
    for a in cells + [chosen]:
        for b in cells:
            if a != b:
                assert max(abs(a // 32 - b // 32), abs(a % 32 - b % 32)) >= 2


def test_the_count_limit_and_fewer_than_asked(codec):
    v = codec.vocab
    lo = v.patch_ids()[0]
    z = _logits(v, {0: 5.0, 40: 4.0, 500: 3.0})
    assert len(candidate_cells(z, lo, v, count=1)) == 1
    assert len(candidate_cells(z, lo, v, count=0)) == 0
    # every cell within one of the chosen one's: a 2x2 grid leaves no candidate 2 cells away
    assert candidate_cells(z[:lo + 4], lo, v, count=3, grid=2) == []


def test_the_second_corner_makes_a_box(codec):
    v = codec.vocab
    lo = v.patch_ids()[0]
    first = lo + 10 * 32 + 10
    z = _logits(v, {3 * 32 + 3: 9.0, 12 * 32 + 15: 5.0})   # the best cell is above-left of the first: not a box
    assert best_second(z, first, v) == lo + 12 * 32 + 15


@pytest.fixture(scope="module")
def backends(tiny_model_dir, tmp_path_factory):
    art = tmp_path_factory.mktemp("cand_artifacts")
    made = {"torch": TorchBackend(str(tiny_model_dir), device="cpu"),
            "torch static": TorchStaticBackend(str(tiny_model_dir), device="cpu"),
            "onnxruntime": OnnxBackend(str(tiny_model_dir), device="cpu", artifacts_dir=str(art))}
    yield made
    for b in made.values():
        b.close()


class Counting:
    """A real backend, its decode_batch calls counted."""

    def __init__(self, inner):
        self.inner, self.decode_calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode_batch(self, caches, tokens):
        self.decode_calls += 1
        return self.inner.decode_batch(caches, tokens)


@pytest.mark.parametrize("name", ["torch", "torch static", "onnxruntime"])
def test_chosen_box_tokens_and_score_are_the_same_with_candidates_on_or_off(backends, codec, tiny_model_dir, name):
    """Candidates are one extra batched decode step on forked caches: the chosen rows are untouched."""
    backend = backends[name]
    processor = load_processor(str(tiny_model_dir))
    rgb, _ = draw_scene(320, 240, np.random.default_rng(2), count=3)
    embeds = backend.encode_image(processor.image_processor(rgb, return_tensors="np")["pixel_values"].astype(np.float32))
    prompts = [codec.encode(f"<grounding><phrase> {t}</phrase>") for t in ("a red square", "a blue square")]
    for constrained in (True, False):
        plain = Counting(backend)
        off = generate(plain, embeds, [Row(p.input_ids, p.image_mask, 8, constrained=constrained) for p in prompts],
                       codec.vocab)
        counted = Counting(backend)
        on = generate(counted, embeds, [Row(p.input_ids, p.image_mask, 8, constrained=constrained, max_candidates=3)
                                        for p in prompts], codec.vocab)
        for a, b in zip(off, on):
            assert (a.token_ids, a.probs, a.presence) == (b.token_ids, b.probs, b.presence)
            assert not a.candidates
        with_box = [g for g in on if any(codec.vocab.is_patch(t) for t in g.token_ids)]
        assert all(1 <= len(g.candidates) <= 3 for g in with_box) and with_box
        assert counted.decode_calls == plain.decode_calls + 1     # one batched step for every row's candidates
        for g in with_box:
            scores = [c.score for c in g.candidates]
            assert scores == sorted(scores, reverse=True)


def test_presence_is_the_probability_of_object_after_the_phrase(backends, codec, tiny_model_dir):
    import torch

    from kosmos2_ros.core.backends.modules import load_kosmos2

    model = load_kosmos2(str(tiny_model_dir))
    processor = load_processor(str(tiny_model_dir))
    rgb, _ = draw_scene(320, 240, np.random.default_rng(3), count=2)
    prompt = "<grounding><phrase> a red square</phrase>"
    inputs = processor(text=prompt, images=rgb, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].numpy()
    want = token_prob(logits, codec.vocab.object_open)
    backend = backends["torch"]
    embeds = backend.encode_image(inputs["pixel_values"].numpy())
    p = codec.encode(prompt)
    for constrained in (True, False):
        gen = generate(backend, embeds, [Row(p.input_ids, p.image_mask, 6, constrained=constrained)], codec.vocab)[0]
        assert abs(gen.presence - want) < 1e-5
    caption = codec.encode("<grounding>An image of")
    assert generate(backend, embeds, [Row(caption.input_ids, caption.image_mask, 4)], codec.vocab)[0].presence is None


def _pipe(tiny_model_dir, backend, **cfg):
    return Pipeline(Kosmos2Config(model=str(tiny_model_dir), backend="torch", device="cpu", enable_3d=False, **cfg),
                    backend, load_processor(str(tiny_model_dir)))


def test_results_carry_presence_candidates_and_the_flag(backends, tiny_model_dir):
    rgb, _ = draw_scene(320, 240, np.random.default_rng(4), count=3)
    pipe = _pipe(tiny_model_dir, backends["torch"], ambiguity_ratio=0.0)
    res = pipe.run(Command(id="a", task="refer", text="a red square"), Frame(rgb=rgb))
    assert 0 < res.presence <= 1 and res.not_found_reason == ""
    assert 1 <= len(res.candidates) <= 3 and res.ambiguous and res.ambiguity > 0
    chosen = res.objects[0]
    assert all(c.box_px != chosen.box_px for c in res.candidates)
    assert res.ambiguity == pytest.approx(res.candidates[0].score / chosen.score)
    one = pipe.run(Command(id="b", task="refer", text="a red square", max_candidates=1), Frame(rgb=rgb))
    assert len(one.candidates) == 1 and one.candidates[0].box_px == res.candidates[0].box_px
    none = pipe.run(Command(id="c", task="refer", text="a red square", max_candidates=0), Frame(rgb=rgb))
    assert none.candidates == [] and not none.ambiguous and none.ambiguity == 0.0
    assert none.objects[0].box_px == chosen.box_px and none.token_ids == res.token_ids
    strict = _pipe(tiny_model_dir, backends["torch"], ambiguity_ratio=1.0).run(
        Command(id="d", task="refer", text="a red square"), Frame(rgb=rgb))
    assert strict.ambiguity == pytest.approx(res.ambiguity) and strict.ambiguous == (strict.ambiguity >= 1.0)
    caption = pipe.run(Command(id="e", task="caption"), Frame(rgb=rgb))
    assert caption.presence == -1.0 and caption.candidates == []


def test_refer_says_why_it_found_nothing(backends, tiny_model_dir):
    rgb, _ = draw_scene(320, 240, np.random.default_rng(5), count=2)
    absent = _pipe(tiny_model_dir, backends["torch"], presence_threshold=0.9999).run(
        Command(id="a", task="refer", text="a red square"), Frame(rgb=rgb))
    assert absent.status == 0 and absent.objects == [] and absent.candidates == []
    assert absent.not_found_reason.startswith(f"presence {absent.presence:.2f} < presence_threshold 0.9999")
    low = _pipe(tiny_model_dir, backends["torch"], score_threshold=1.0).run(
        Command(id="b", task="refer", text="a red square"), Frame(rgb=rgb))
    assert low.objects == [] and low.not_found_reason == "every box scored below score_threshold 1"


def test_descriptions_of_an_ambiguous_result_are_one_batch(backends, tiny_model_dir):
    rgb, _ = draw_scene(320, 240, np.random.default_rng(6), count=3)
    pipe = _pipe(tiny_model_dir, backends["torch"], ambiguity_ratio=0.0, describe_candidates=True)
    calls, order = [], []
    real = pipe._decode_frame

    def counted(frame, plans, on_token, should_stop):
        calls.append(len(plans))
        return real(frame, plans, on_token, should_stop)

    pipe._decode_frame = counted
    res = pipe.run(Command(id="a", task="refer", text="a blue square"), Frame(rgb=rgb),
                   on_candidates=lambda r: order.append([c.description for c in r.candidates]))
    boxes = res.objects[:1] + res.candidates
    assert calls == [1, len(boxes)]                          # the command, then every box's description at once
    assert order == [[""] * len(res.candidates)]             # candidates reported before they were described
    assert all(b.description for b in boxes)
    quiet = pipe.run(Command(id="b", task="refer", text="a blue square", describe_candidates=0), Frame(rgb=rgb))
    assert all(not b.description for b in quiet.objects + quiet.candidates)


def test_descriptions_within_a_small_token_limit_keep_the_result(backends, tiny_model_dir):
    """With max_new_tokens_limit below the descriptions' 24 tokens, the boxes are described within the
    limit and the grounded result is answered OK (the refused description plan used to fail the batch)."""
    rgb, _ = draw_scene(320, 240, np.random.default_rng(6), count=3)
    pipe = _pipe(tiny_model_dir, backends["torch"], ambiguity_ratio=0.0, describe_candidates=True,
                 max_new_tokens=8, max_new_tokens_limit=16)
    res = pipe.run(Command(id="a", task="refer", text="a blue square"), Frame(rgb=rgb))
    assert res.status == 0, res.error
    assert res.objects and res.ambiguous
    assert all(b.description for b in res.objects[:1] + res.candidates)


def test_region_text_becomes_a_short_description():
    assert described_as("It is a red mug next to the laptop.") == "a red mug next to the laptop"
    assert described_as("It sits on the shelf.") == "sits on the shelf"
    assert described_as("") == ""


def test_presence_tells_present_from_absent_on_a_trained_toy(which_one_dir):
    """On images it was not trained on, presence separates the toy's present objects from absent ones;
    with presence_threshold 0.5 an absent one answers OK with no object and the reason."""
    from kosmos2_ros.eval.metrics import auc
    from kosmos2_ros.fixtures.checkpoints import EXPRESSIONS, toy_image, which_one_cells

    pipe = Pipeline.load(Kosmos2Config(model=str(which_one_dir), backend="torch", device="cpu", allow_download=False,
                                       presence_threshold=0.5, max_candidates=0))
    present, absent = [], []
    for seed in WHICH_ONE_TEST_IMAGES:
        frame = Frame(rgb=toy_image(seed))
        for e, expr in enumerate(EXPRESSIONS):
            res = pipe.run(Command(id=f"{seed}-{e}", task="refer", text=expr), frame)
            is_absent = not which_one_cells(e, seed)
            (absent if is_absent else present).append(res.presence)
            if is_absent and res.presence < 0.5:
                assert res.objects == [] and res.not_found_reason.startswith("presence ")
    assert auc(present, absent) >= 0.95
    assert np.mean(np.array(absent) >= 0.5) <= 0.1 and np.mean(np.array(present) < 0.5) <= 0.1
    pipe.close()


def test_candidates_hold_the_second_object_and_the_flag_marks_two_object_scenes(which_one_dir):
    """On unseen images: in a two-object scene the object not chosen is among the candidates and the
    result is flagged ambiguous, in a one-object scene it is not flagged, each more often than not
    (`bench/which_one_toy.py` prints these rates; docs/which-one.md has them)."""
    from kosmos2_ros.fixtures.checkpoints import which_one_rates

    pipe = Pipeline.load(Kosmos2Config(model=str(which_one_dir), backend="torch", device="cpu", allow_download=False,
                                       max_candidates=3, ambiguity_ratio=0.5, enable_3d=False))
    rates = which_one_rates(pipe, WHICH_ONE_TEST_IMAGES)
    pipe.close()
    one, two = rates["one"], rates["two"]
    assert one["n"] == two["n"] == 2 * len(WHICH_ONE_TEST_IMAGES)   # 4 expressions on each image of its kind, half the images
    assert one["chosen_right"] > 0.9 and two["chosen_right"] > 0.9
    assert two["second_found"] > 0.5
    assert two["ambiguous"] > 0.5 > one["ambiguous"]
    assert two["ambiguity_median"] > 0.5 > one["ambiguity_median"]
