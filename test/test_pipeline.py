"""The pipeline against transformers' own `generate` + `post_process_generation`: same token ids, text and boxes.

Two checkpoints, both saved with `save_pretrained` and loaded through `Pipeline.load`: one built by
transformers alone (`hf_saved_model_dir`, shortest-edge resize + centre crop) and the package's
trained tiny one (`tiny_model_dir`, exact 224x224 resize as the real checkpoint). For every task the
pipeline's token ids and parsed entities must equal the reference's for the same image, prompt and
max_new_tokens.
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import pytest

from kosmos2_ros.core.model.reference import reference_generate
from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline, Status
from kosmos2_ros.fixtures.scenes import draw_scene

MAX_NEW = 24
CHECKPOINTS = ("hf_saved_model_dir", "tiny_model_dir")


class Loaded:
    """A pipeline and, independently, the reference model and processor from the same directory."""

    def __init__(self, model_dir: str) -> None:
        import torch
        from transformers import AutoProcessor

        from kosmos2_ros.core.backends.modules import load_kosmos2

        torch.manual_seed(0)
        self.model_dir = model_dir
        self.pipeline = Pipeline.load(Kosmos2Config(model=model_dir, backend="torch", device="cpu",
                                                    decoding="free", allow_download=False))
        self.model = load_kosmos2(model_dir)
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.rgb, self.objects = draw_scene(333, 251, np.random.default_rng(5), count=3)

    def frame(self) -> Frame:
        return Frame(rgb=self.rgb.copy(), stamp_ns=1, frame_id="cam")

    def reference(self, prompt: str, bboxes: Optional[list] = None,
                  max_new_tokens: int = MAX_NEW) -> Tuple[List[int], Any]:
        """transformers' greedy generate and post-processing: (new token ids, (text, entities))."""
        ref = reference_generate(self.model, self.processor, prompt, self.rgb, max_new_tokens, bboxes=bboxes)
        return ref.new_ids, ref.parsed

    def region_norm(self, box_px: Tuple[float, float, float, float]) -> Tuple[float, float, float, float]:
        """The region in model-input coordinates, computed here from the processor's settings."""
        ip = self.processor.image_processor
        h, w = self.rgb.shape[:2]
        x0, y0, x1, y1 = box_px
        if "shortest_edge" in ip.size:
            short = ip.size["shortest_edge"]
            rw, rh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            cw, ch = ip.crop_size["width"], ip.crop_size["height"]
            left, top = (rw - cw) // 2, (rh - ch) // 2
            sx, sy = rw / w, rh / h

            def nx(v: float) -> float:
                return min(max((v * sx - left) / cw, 0.0), 1.0)

            def ny(v: float) -> float:
                return min(max((v * sy - top) / ch, 0.0), 1.0)

            return (nx(x0), ny(y0), nx(x1), ny(y1))
        return (x0 / w, y0 / h, x1 / w, y1 / h)


@pytest.fixture(scope="module", params=CHECKPOINTS)
def loaded(request: pytest.FixtureRequest) -> Loaded:
    return Loaded(str(request.getfixturevalue(request.param)))


def entities_of(result: Any) -> list:
    return [(e.phrase, tuple(e.span), [tuple(b) for b in e.boxes_norm]) for e in result.entities]


def ref_entities(ref: Any) -> list:
    return [(p, tuple(s), [tuple(b) for b in boxes]) for p, s, boxes in ref[1]]


SIMPLE_TASKS = [
    # (task, text, reference prompt)
    ("refer", "a red square", "<grounding><phrase> a red square</phrase>"),
    ("caption", "", "<grounding>An image of"),
    ("describe", "", "<grounding>Describe this image in detail:"),
    ("vqa", "What color is the square?", "<grounding> Question: What color is the square? Answer:"),
    ("raw", "An image of a dog and", "<grounding>An image of a dog and"),
]


@pytest.mark.parametrize("task,text,prompt", SIMPLE_TASKS, ids=[t[0] for t in SIMPLE_TASKS])
def test_task_matches_transformers_generate(loaded: Loaded, task: str, text: str, prompt: str) -> None:
    res = loaded.pipeline.run(Command(id=task, task=task, text=text, max_new_tokens=MAX_NEW, decoding="free"),
                              loaded.frame())
    assert res.status == Status.OK, res.error
    ids, ref = loaded.reference(prompt)
    assert res.token_ids == ids
    assert res.text == ref[0]
    assert entities_of(res) == ref_entities(ref)


def test_region_matches_transformers_generate(loaded: Loaded) -> None:
    box_px = tuple(float(v) for v in loaded.objects[1]["box"])
    res = loaded.pipeline.run(Command(id="r", task="region", region_px=box_px, max_new_tokens=MAX_NEW,
                                      decoding="free"), loaded.frame())
    assert res.status == Status.OK, res.error
    ids, ref = loaded.reference("<grounding><phrase> It</phrase> is", bboxes=[loaded.region_norm(box_px)])
    assert res.token_ids == ids
    assert res.text == ref[0]
    assert entities_of(res) == ref_entities(ref)
    # The input box is the first entity, "It", and scores 1.0 (its tokens came from the prompt).
    assert res.entities[0].phrase == "It"
    assert res.entities[0].scores[0] == 1.0


@pytest.mark.parametrize("question, prompt", [
    ("What is [this] used for?", "<grounding> Question: What is<phrase> this</phrase> used for? Answer:"),
    ("what is it", "<grounding> Question: what is<phrase> it</phrase> Answer:"),
    ("[The square] is what colour?", "<grounding> Question:<phrase> The square</phrase> is what colour? Answer:"),
])
def test_a_question_about_a_region_is_the_processors_prompt_and_generate(loaded: Loaded, question: str,
                                                                          prompt: str) -> None:
    """vqa with a region: the prompt's ids are what Kosmos2Processor makes of the paper's form and the box,
    and the answer is generate's."""
    box_px = tuple(float(v) for v in loaded.objects[0]["box"])
    res = loaded.pipeline.run(Command(id="rq", task="vqa", text=question, region_px=box_px, max_new_tokens=MAX_NEW,
                                      decoding="free"), loaded.frame())
    assert res.status == Status.OK, res.error
    from PIL import Image

    ref_inputs = loaded.processor(text=prompt, images=Image.fromarray(loaded.rgb), bboxes=[loaded.region_norm(box_px)])
    assert res.prompt_ids == list(ref_inputs["input_ids"])
    ids, ref = loaded.reference(prompt, bboxes=[loaded.region_norm(box_px)])
    assert res.token_ids == ids
    assert res.text == ref[0]
    assert res.answer == "" and res.answer_probability == -1.0        # vqa reads no yes/no


def test_a_check_answers_with_p_yes_from_the_same_logits(loaded: Loaded) -> None:
    """check: generate's tokens, and answer_probability equal to p(yes) / (p(yes) + p(no)) from an independent
    float64 softmax over the reference model's own next-token logits, over the tokenizer's spellings."""
    import torch
    from PIL import Image

    vocab = loaded.pipeline.vocab
    assert vocab.yes_tokens and vocab.no_tokens and not set(vocab.yes_tokens) & set(vocab.no_tokens)
    tok = loaded.processor.tokenizer
    for words, tokens in ((("yes", "Yes", "YES"), vocab.yes_tokens), (("no", "No", "NO"), vocab.no_tokens)):
        for piece in tok.convert_ids_to_tokens(list(tokens)):     # each starts a spelling of the answer
            assert any(w.startswith(piece.strip("\u2581 ")) for w in words), (piece, words)
    box_px = tuple(float(v) for v in loaded.objects[1]["box"])
    for question, region in (("Is there a red square?", None), ("Is [this] red?", box_px)):
        res = loaded.pipeline.run(Command(id="c", task="check", text=question, region_px=region, max_new_tokens=8,
                                          decoding="free"), loaded.frame())
        assert res.status == Status.OK, res.error
        bboxes = [loaded.region_norm(region)] if region else None
        prompt = ("<grounding> Question: Is<phrase> this</phrase> red? Answer:" if region
                  else "<grounding> Question: Is there a red square? Answer:")
        ids, _ = loaded.reference(prompt, bboxes=bboxes, max_new_tokens=8)
        assert res.token_ids == ids
        inputs = loaded.processor(text=prompt, images=Image.fromarray(loaded.rgb), bboxes=bboxes, return_tensors="pt")
        with torch.inference_mode():
            out = loaded.model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                               attention_mask=inputs["attention_mask"],
                               image_embeds_position_mask=inputs["image_embeds_position_mask"])
        p = torch.softmax(out.logits[0, -1].double(), dim=-1)
        p_yes, p_no = float(p[list(vocab.yes_tokens)].sum()), float(p[list(vocab.no_tokens)].sum())
        assert res.answer_probability == pytest.approx(p_yes / (p_yes + p_no), rel=1e-4, abs=1e-6)
        assert res.answer == ("yes" if res.answer_probability >= 0.5 else "no")


def test_phrase_grounding_matches_transformers_per_phrase(loaded: Loaded) -> None:
    text = "An image of [a red square] next to [a blue square]"
    res = loaded.pipeline.run(Command(id="pg", task="phrase_grounding", text=text, max_new_tokens=MAX_NEW,
                                      decoding="free"), loaded.frame())
    assert res.status == Status.OK, res.error
    prompts = ["<grounding>An image of<phrase> a red square</phrase>",
               "<grounding>An image of a red square next to<phrase> a blue square</phrase>"]
    all_ids: List[int] = []
    expected = []
    for prompt, clean_prompt in zip(prompts, ("An image of a red square", "An image of a red square next to a blue square")):
        ids, ref = loaded.reference(prompt)
        all_ids += ids
        # The phrase's boxes are those transformers' parser attaches to it: the entity whose span
        # ends where the prompt's phrase ends (a rambling generation adds others after it).
        asked = [(phrase, [tuple(b) for b in boxes]) for phrase, span, boxes in ref[1] if span[1] == len(clean_prompt)]
        expected += asked[:1]
    assert res.token_ids == all_ids
    assert [(e.phrase, [tuple(b) for b in e.boxes_norm]) for e in res.entities] == expected
    assert res.text == "An image of a red square next to a blue square"
    for e in res.entities:
        assert res.text[e.span[0]:e.span[1]] == e.phrase


def test_max_new_tokens_is_honoured(loaded: Loaded) -> None:
    for n in (1, 3):
        res = loaded.pipeline.run(Command(task="caption", max_new_tokens=n, decoding="free"), loaded.frame())
        ids, ref = loaded.reference("<grounding>An image of", max_new_tokens=n)
        assert res.token_ids == ids and len(ids) <= n
        assert entities_of(res) == ref_entities(ref)


def test_prompt_ids_equal_processor(loaded: Loaded) -> None:
    from PIL import Image

    codec = loaded.pipeline.codec
    image = Image.fromarray(loaded.rgb)
    cases = [("<grounding><phrase> a red square</phrase>", None),
             ("<grounding>An image of", None),
             ("<grounding> Question: Where is it? Answer:", None),
             ("<grounding><phrase> It</phrase> is", [(0.1, 0.2, 0.55, 0.9)]),
             ("<grounding>x<phrase> one</phrase> and<phrase> two</phrase>", [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)])]
    for text, bboxes in cases:
        ref = loaded.processor(text=text, images=image, bboxes=bboxes)
        mine = codec.encode(text, bboxes)
        assert mine.input_ids == list(ref["input_ids"]), text
        assert mine.image_mask == list(ref["image_embeds_position_mask"]), text


class CountingBackend:
    """Wraps a backend and counts image encodings."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.encode_calls = 0
        self.prefill_tokens: list = []

    def encode_image(self, pixel_values: Any) -> Any:
        self.encode_calls += 1
        return self.inner.encode_image(pixel_values)

    def prefill(self, image_embeds: Any, input_ids: Any, image_mask: Any, cache: Any = None) -> Any:
        self.prefill_tokens.append(len(input_ids))
        return self.inner.prefill(image_embeds, input_ids, image_mask, cache=cache)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def counting(loaded: Loaded) -> Iterator[CountingBackend]:
    """The loaded pipeline's backend, wrapped to count calls for the duration of a test."""
    inner = loaded.pipeline.backend
    loaded.pipeline.backend = CountingBackend(inner)
    try:
        yield loaded.pipeline.backend
    finally:
        loaded.pipeline.backend = inner


def test_image_encoded_once_per_frame(loaded: Loaded, counting: CountingBackend) -> None:
    pipe = loaded.pipeline
    frame = loaded.frame()
    first = pipe.run(Command(task="refer", text="a red square", max_new_tokens=8, decoding="free"), frame)
    second = pipe.run(Command(task="caption", max_new_tokens=8, decoding="free"), frame)
    assert first.status == Status.OK and second.status == Status.OK
    assert counting.encode_calls == 1
    assert first.timings_ms["encode"] > 0 and second.timings_ms["encode"] == 0
    pipe.run(Command(task="caption", max_new_tokens=4, decoding="free"), loaded.frame())
    assert counting.encode_calls == 2   # a new frame is encoded again


def test_lone_command_prefills_once_and_leaves_the_prefix_for_the_next(loaded: Loaded,
                                                                        counting: CountingBackend) -> None:
    """A single command on a new frame costs one prefill of its whole prompt; the next command
    about the frame prefills only its own suffix on the kept prefix, with the same tokens as alone."""
    pipe = loaded.pipeline
    frame = loaded.frame()
    first = pipe.run(Command(task="refer", text="a red square", max_new_tokens=8, decoding="free"), frame)
    assert first.status == Status.OK
    assert counting.prefill_tokens == [len(first.prompt_ids)]
    counting.prefill_tokens.clear()
    second = pipe.run(Command(task="refer", text="a blue square", max_new_tokens=8, decoding="free"), frame)
    prefix_len = second.prompt_ids.index(pipe.vocab.grounding) + 1
    assert counting.prefill_tokens in ([], [len(second.prompt_ids) - prefix_len])  # prefill_batch may batch it
    alone = pipe.run(Command(task="refer", text="a blue square", max_new_tokens=8, decoding="free"), loaded.frame())
    assert second.token_ids == alone.token_ids


def test_run_batch_equals_individual_runs(loaded: Loaded) -> None:
    commands = [Command(id="a", task="refer", text="a blue square", max_new_tokens=12, decoding="free"),
                Command(id="b", task="caption", max_new_tokens=16, decoding="free"),
                Command(id="c", task="vqa", text="What is on the table?", max_new_tokens=10, decoding="free"),
                Command(id="d", task="refer", text="", max_new_tokens=10),           # invalid, keeps its slot
                Command(id="e", task="refer", text="a green square", max_new_tokens=12, decoding="constrained")]
    batch = loaded.pipeline.run_batch(commands, loaded.frame())
    assert [r.id for r in batch] == ["a", "b", "c", "d", "e"]
    for cmd, got in zip(commands, batch):
        alone = loaded.pipeline.run(cmd, loaded.frame())
        assert got.status == alone.status
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text
        assert entities_of(got) == entities_of(alone)
    assert batch[3].status == Status.INVALID


def test_generated_box_scores_are_probabilities(tiny_model_dir: Any) -> None:
    loaded = _trained(tiny_model_dir)
    seen = 0
    for text in ("a red square", "a blue square", "a green square"):
        res = loaded.pipeline.run(Command(task="refer", text=text, max_new_tokens=MAX_NEW, decoding="free"),
                                  loaded.frame())
        assert res.status == Status.OK
        for ent in res.entities:
            assert len(ent.scores) == len(ent.boxes_norm)
            for s in ent.scores:
                assert 0.0 <= s <= 1.0
                seen += 1
        for obj in res.objects:
            assert 0.0 <= obj.score <= 1.0
            x0, y0, x1, y1 = obj.box_px
            assert 0 <= x0 <= x1 <= 333 and 0 <= y0 <= y1 <= 251
    assert seen >= 1, "the trained tiny checkpoint should ground at least one box"


_TRAINED: dict = {}


def _trained(model_dir: Any) -> Loaded:
    key = str(model_dir)
    if key not in _TRAINED:
        _TRAINED[key] = Loaded(key)
    return _TRAINED[key]


def test_trained_checkpoint_writes_structured_output(tiny_model_dir: Any) -> None:
    """The trained tiny checkpoint decodes freely into phrases, boxes and eos (not one repeated token)."""
    loaded = _trained(tiny_model_dir)
    vocab = loaded.pipeline.vocab
    res = loaded.pipeline.run(Command(task="refer", text="a red square", max_new_tokens=MAX_NEW, decoding="free"),
                              loaded.frame())
    assert res.status == Status.OK
    assert len(res.entities) >= 1 and res.entities[0].phrase == "a red square"
    assert res.token_ids[0] == vocab.object_open and vocab.is_patch(res.token_ids[1])
    assert vocab.eos in res.token_ids, res.raw_text
    for cmd in (Command(task="vqa", text="What color is the square?", max_new_tokens=MAX_NEW, decoding="free"),
                Command(task="region", region_px=(10.0, 10.0, 120.0, 100.0), max_new_tokens=MAX_NEW, decoding="free")):
        out = loaded.pipeline.run(cmd, loaded.frame())
        assert out.token_ids[-1] == vocab.eos, out.raw_text
        assert len(set(out.token_ids)) >= 3
    cap = loaded.pipeline.run(Command(task="caption", max_new_tokens=64, decoding="free"), loaded.frame())
    assert len(set(cap.token_ids)) > 5, cap.raw_text
    assert cap.entities and all(e.boxes_norm and e.phrase.endswith("square") for e in cap.entities), cap.raw_text


def test_constrained_refer_gives_well_formed_boxes(loaded: Loaded) -> None:
    """One entity with one or more boxes (the delimiter is allowed, as in Kosmos-2's format), closed by </object>."""
    vocab = loaded.pipeline.vocab
    for text in ("a red square", "the dog"):
        res = loaded.pipeline.run(Command(task="refer", text=text, max_new_tokens=MAX_NEW, decoding="constrained"),
                                  loaded.frame())
        assert res.status == Status.OK, res.error
        assert len(res.entities) == 1
        ent = res.entities[0]
        assert ent.phrase == text and len(ent.boxes_norm) >= 1
        ids = res.token_ids
        assert ids[0] == vocab.object_open and ids[-1] == vocab.object_close
        body = ids[1:-1]
        assert len(body) == 3 * len(ent.boxes_norm) - 1
        for k, tok in enumerate(body):
            assert vocab.is_patch(tok) if k % 3 < 2 else tok == vocab.delimiter
        for (x0, y0, x1, y1), score in zip(ent.boxes_norm, ent.scores):
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert 0.0 <= score <= 1.0
        assert len(res.objects) == len(ent.boxes_norm)


@pytest.mark.parametrize("command,needle", [
    (Command(task="refer", text=""), "non-empty"),
    (Command(task="refer", text="   "), "non-empty"),
    (Command(task="vqa", text=""), "non-empty"),
    (Command(task="refer", text="x" * 100_000), "limit"),
    (Command(task="refer", text="a <phrase>dog"), "control token"),
    (Command(task="raw", text="</object><patch_index_0042>"), "control token"),
    (Command(task="vqa", text="why < Object > here"), "control token"),
    (Command(task="phrase_grounding", text="a [dog</s>]"), "control token"),
    (Command(task="vqa", text="what\x00is"), "control character"),
    (Command(task="region", region_px=(400.0, 10.0, 500.0, 50.0)), "outside"),
    (Command(task="region", region_px=(-50.0, -50.0, -1.0, -1.0)), "outside"),
    (Command(task="region", region_px=(10.0, 10.0, 10.0, 50.0)), "empty"),
    (Command(task="region", region_px=(float("nan"), 10.0, 20.0, 50.0)), "finite"),
    (Command(task="region"), "needs a region"),
    (Command(task="vqa", text="Is the drawer open?", region_px=(10.0, 10.0, 60.0, 50.0)), "[bracket] it"),
    (Command(task="check", text="Is [a] in [b]?", region_px=(10.0, 10.0, 60.0, 50.0)), "only one"),
    (Command(task="check", text="Is [this] open?", region_px=(400.0, 10.0, 500.0, 50.0)), "outside"),
    (Command(task="vqa", text="What is [this]?", region_px=(10.0, 10.0, 10.0, 50.0)), "empty"),
    (Command(task="check", text=""), "non-empty"),
    (Command(task="segment", text="x"), "unknown task"),
    (Command(task="refer", text="a dog", max_new_tokens=100_000), "max_new_tokens"),
    (Command(task="refer", text="a dog", max_new_tokens=-3), "max_new_tokens"),
    (Command(task="refer", text="a dog", decoding="beam"), "decoding"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_commands(loaded: Loaded, command: Command, needle: str) -> None:
    res = loaded.pipeline.run(command, loaded.frame())
    assert res.status == Status.INVALID
    assert needle in res.error, res.error
    assert res.token_ids == [] and res.width == 333 and res.height == 251


def test_region_box_comes_back_in_source_pixels(loaded: Loaded) -> None:
    """The region's own box returns in source pixels at the same place (within a grid cell)."""
    box_px = (40.0, 30.0, 200.0, 180.0)
    res = loaded.pipeline.run(Command(task="region", region_px=box_px, max_new_tokens=6, decoding="free"),
                              loaded.frame())
    assert res.status == Status.OK
    back = res.entities[0].boxes_px[0]
    geom = loaded.pipeline.encode(loaded.frame()).geometry
    # What the model sees of the region: clipped to the processor's window (centre crop).
    want = (max(box_px[0], geom.win_x), max(box_px[1], geom.win_y),
            min(box_px[2], geom.win_x + geom.win_w), min(box_px[3], geom.win_y + geom.win_h))
    cell_w, cell_h = geom.win_w / 32, geom.win_h / 32
    for got, exp, tol in zip(back, want, (cell_w, cell_h, cell_w, cell_h)):
        assert abs(got - exp) <= tol + 1e-6, (back, want)


def test_phrase_grounding_keeps_text_after_the_last_phrase(loaded: Loaded) -> None:
    res = loaded.pipeline.run(Command(task="phrase_grounding", text="A man [walking a dog] on the beach.",
                                      max_new_tokens=6, decoding="constrained"), loaded.frame())
    assert res.status == Status.OK, res.error
    assert res.text == "A man walking a dog on the beach."
    assert [e.phrase for e in res.entities] == ["walking a dog"]
    assert res.text[res.entities[0].span[0]:res.entities[0].span[1]] == "walking a dog"
