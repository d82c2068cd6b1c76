"""`core.grounding` against transformers' Kosmos-2 post-processing, property-tested on any input.

The reference is `Kosmos2Processor.post_process_generation` (which splits at `</image>` and calls
`clean_text_and_extract_entities_with_bboxes`). Floats are compared exactly.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import Kosmos2Processor
from transformers.models.kosmos2.processing_kosmos2 import (
    clean_text_and_extract_entities_with_bboxes,
    coordinate_to_patch_index,
    patch_index_to_coordinate,
)

from kosmos2_ros.core.model.grounding import (
    ParsedText,
    attach_scores,
    box_to_patch_index,
    parse_generation,
    patch_index_to_box,
    prompt_phrase_entity,
)
from kosmos2_ros.core.model.vocab import PATCH_TOKEN_RE

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_PROCESSOR_STUB = SimpleNamespace(eoi_token="</image>")


def reference(text: str):
    """transformers' own post-processing (the unbound method needs only `eoi_token`)."""
    return Kosmos2Processor.post_process_generation(_PROCESSOR_STUB, text)


def assert_agrees(text: str) -> None:
    ours = parse_generation(text).as_reference()
    ref = reference(text)
    assert ours == ref, f"{text!r}\nours: {ours}\nref:  {ref}"
    assert ref == clean_text_and_extract_entities_with_bboxes(text.split("</image>")[-1])


# -- strategies ----------------------------------------------------------------------------

# Plain text: letters, digits, punctuation, spaces (incl. tabs/newlines), accented and CJK
# characters, emoji, and the odd '<' or '>' on its own.
PLAIN = st.lists(st.one_of(
    st.sampled_from(list("abcXYZ019 .,;:!?'\"-_/\\()[]{}#")),
    st.sampled_from([" ", "  ", "\t", "\n", "\u00a0", "\u3000"]),
    st.sampled_from(["é", "ß", "猫", "🙂", "\u200b", "\u0301"]),
    st.sampled_from(["<", ">", "< ", "<x", "/>"]),
), max_size=12).map("".join)
WORDS = st.text(alphabet=st.sampled_from(list("ab cé猫🙂 \t.")), min_size=0, max_size=10)
PATCH_NUM = st.one_of(st.integers(0, 1023), st.integers(1024, 99999))


@st.composite
def patch(draw) -> str:
    n = draw(PATCH_NUM)
    style = draw(st.sampled_from(["04d", "d", "05d"]))
    return f"<patch_index_{n:{style}}>"


@st.composite
def pair(draw) -> str:
    return draw(patch()) + draw(patch())


@st.composite
def well_formed_entity(draw) -> str:
    boxes = draw(st.lists(pair(), min_size=1, max_size=3))
    obj = "<object>" + "</delimiter_of_multi_objects/>".join(boxes) + "</object>"
    if draw(st.booleans()):
        phrase = draw(st.text(alphabet=st.sampled_from(list("ab cé猫 \t")), min_size=1, max_size=10))
        return f"<phrase>{phrase}</phrase>{obj}"
    return obj


@st.composite
def well_formed(draw) -> str:
    head = draw(st.sampled_from(["", "<grounding>", "<grounding> ", "<image>x</image><grounding>",
                                 "<s><image></image><grounding>", "</image>"]))
    parts = [head]
    for _ in range(draw(st.integers(0, 4))):
        parts.append(draw(WORDS))
        parts.append(draw(well_formed_entity()))
    parts.append(draw(WORDS))
    if draw(st.booleans()):
        parts.append("</s>")
    return "".join(parts)


TAGS = ["<phrase>", "</phrase>", "<object>", "</object>", "</delimiter_of_multi_objects/>", "<grounding>",
        "<image>", "</image>", "<s>", "</s>", "<pad>", "</doc>", "</chunk>", "</line>", "<unk>",
        "<patch_index_0000>", "<patch_index_1023>", "<patch_index_0042>", "<patch_index_7>",
        "<patch_index_>", "<patch_index_12a>", "<PHRASE>", "< phrase>", "<b>", "<>", "<<", ">>", "<a\nb>"]


@st.composite
def mixture(draw) -> str:
    """Random sequences of tag strings, patch tokens and text: anything the model could emit."""
    pieces = draw(st.lists(st.one_of(st.sampled_from(TAGS), patch(), PLAIN, well_formed_entity()), max_size=14))
    return "".join(pieces)


@st.composite
def malformed(draw) -> str:
    """A well-formed sequence with one deliberate defect."""
    ul, lr = draw(patch()), draw(patch())
    phrase = draw(st.text(alphabet=st.sampled_from(list("ab c")), min_size=1, max_size=6))
    defects = [
        f"<phrase>{phrase}<object>{ul}{lr}</object>",                        # unclosed phrase
        f"<phrase>{phrase}</phrase>",                                        # phrase without box
        f"<phrase>{phrase}</phrase><object>{ul}</object>",                   # lone patch token
        f"{ul}",                                                             # lone patch token in text
        f"<object>{ul}{lr}",                                                 # unclosed object
        f"<phrase>{phrase}</phrase><object>{ul}{lr}{ul}</object>",           # three patch tokens
        f"<phrase>{phrase}</phrase><object>{lr}{ul}</object>",               # swapped corners
        f"<phrase>{phrase}</phrase><object>{ul}{lr}</delimiter_of_multi_objects/></object>",  # dangling delimiter
        f"<phrase>{phrase}</phrase><object></delimiter_of_multi_objects/>{ul}{lr}</object>",
        f"<object>{ul}{lr}</delimiter_of_multi_objects/>{lr}{ul}</object>",   # boxes without phrase
        f"<phrase><phrase>{phrase}</phrase></phrase><object>{ul}{lr}</object>",
        f"<phrase>{phrase}<b>x</b></phrase><object>{ul}{lr}</object>",       # other tags inside
        f"<phrase></phrase><object>{ul}{lr}</object>",                       # empty phrase
        f"<phrase>   </phrase><object>{ul}{lr}</object>",                    # blank phrase
        f"<phrase>{phrase}</phrase> <object>{ul}{lr}</object>",              # space before object
        f"<phrase>{phrase}</phrase><object>{ul} {lr}</object>",              # space between corners
        f"</object>{ul}{lr}<object>",
    ]
    before, after = draw(WORDS), draw(WORDS)
    return draw(st.sampled_from(["", "<grounding>"])) + before + draw(st.sampled_from(defects)) + after


# -- parse_generation == post_process_generation ------------------------------------------------

DOC_EXAMPLE = ("<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863>"
               "</object> warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911>"
               "</object>.")


def test_documented_example() -> None:
    parsed = parse_generation(DOC_EXAMPLE)
    assert parsed.text == "An image of a snowman warming himself by a fire."
    assert parsed.as_reference()[1] == [("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)]),
                                        ("a fire", (41, 47), [(0.171875, 0.015625, 0.484375, 0.890625)])]
    assert_agrees(DOC_EXAMPLE)


@pytest.mark.parametrize("text", [
    "", " ", "</image>", "no tags at all", "<grounding>", "<phrase>", "<patch_index_0001>",
    "<phrase> a dog</phrase><object><patch_index_0001><patch_index_0002></object>",
    "<phrase> a dog<object><patch_index_0001><patch_index_0002></object>",
    "<phrase> dogs</phrase><object><patch_index_0001><patch_index_0002></delimiter_of_multi_objects/>"
    "<patch_index_0100><patch_index_0200></object> run",
    "<object><patch_index_0001><patch_index_0002></delimiter_of_multi_objects/><patch_index_0003>"
    "<patch_index_0004></object>",
    "<phrase> x</phrase><object><patch_index_0900><patch_index_0010></object>",   # swapped corners
    "prompt</image><grounding> A<phrase> b</phrase><object><patch_index_0000><patch_index_1023></object>",
    "a</image>b</image><phrase>c</phrase><object><patch_index_0000><patch_index_0000></object>",
    "  lead <b>bold</b><phrase>  spaced  </phrase><object><patch_index_0033><patch_index_0066></object>  ",
    "<phrase>猫 🙂</phrase><object><patch_index_0033><patch_index_0066></object>é\u0301",
    "<phrase>a\nb</phrase><object><patch_index_0033><patch_index_0066></object>",
    "<a\nb><phrase>x</phrase><object><patch_index_0033><patch_index_0066></object>",
])
def test_examples_agree(text: str) -> None:
    assert_agrees(text)


@SETTINGS
@given(well_formed())
def test_well_formed_agrees(text: str) -> None:
    assert_agrees(text)


@SETTINGS
@given(malformed())
def test_malformed_agrees(text: str) -> None:
    assert_agrees(text)


@SETTINGS
@given(mixture())
@example("<phrase>a</phrase><object><patch_index_1><patch_index_2></object></image><phrase>")
def test_random_mixtures_agree(text: str) -> None:
    assert_agrees(text)


@SETTINGS
@given(st.text(max_size=40))
def test_any_text_agrees(text: str) -> None:
    assert_agrees(text)


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(TAGS), patch(), st.text(max_size=4)), max_size=20).map("".join),
       st.sampled_from([8, 16, 32]))
def test_other_grid_sizes_agree(text: str, per_side: int) -> None:
    caption = text.split("</image>")[-1]
    assert parse_generation(text, per_side).as_reference() == clean_text_and_extract_entities_with_bboxes(
        caption, num_patches_per_side=per_side)


# -- which location tokens made each box (for scores) --------------------------------------------

@SETTINGS
@given(st.one_of(well_formed(), malformed(), mixture()))
def test_patch_occurrences_point_at_the_boxes_tokens(text: str) -> None:
    parsed = parse_generation(text)
    tokens = [int(m.group(1)) for m in PATCH_TOKEN_RE.finditer(text.split("</image>")[-1])]
    for ent in parsed.entities:
        assert len(ent.patch_occurrences) == len(ent.boxes_norm)
        for (first, second), box in zip(ent.patch_occurrences, ent.boxes_norm):
            assert 0 <= first < second < len(tokens)
            assert patch_index_to_box(tokens[first], tokens[second]) == box


def test_attach_scores_multiplies_the_two_location_probabilities() -> None:
    text = ("<grounding><phrase> It</phrase><object><patch_index_0001><patch_index_0100></object> is"
            "<phrase> a dog</phrase><object><patch_index_0002><patch_index_0300></delimiter_of_multi_objects/>"
            "<patch_index_0004><patch_index_0500></object>")
    parsed = parse_generation(text)
    attach_scores(parsed, [None, None, 0.5, 0.25, 0.8, 1.0])
    assert parsed.entities[0].scores == [1.0]                 # prompt tokens score 1
    assert parsed.entities[1].scores == [0.125, 0.8]
    attach_scores(parsed, [None, 0.5])                        # too few: the boxes without tokens are NaN
    assert parsed.entities[0].scores == [0.5]
    assert all(math.isnan(s) for s in parsed.entities[1].scores)
    attach_scores(parsed, [])
    assert all(math.isnan(s) for e in parsed.entities for s in e.scores)


def test_attach_scores_on_text_without_entities() -> None:
    parsed = parse_generation("plain text")
    attach_scores(parsed, [0.3])
    assert parsed.entities == [] and isinstance(parsed, ParsedText)


@SETTINGS
@given(well_formed(), st.randoms(use_true_random=False))
def test_attach_scores_are_probabilities(text: str, rnd) -> None:
    parsed = parse_generation(text)
    n = len(PATCH_TOKEN_RE.findall(text.split("</image>")[-1]))
    probs = [None if rnd.random() < 0.2 else rnd.random() for _ in range(n)]
    attach_scores(parsed, probs)
    for ent in parsed.entities:
        assert len(ent.scores) == len(ent.boxes_norm)
        for s in ent.scores:
            assert 0.0 <= s <= 1.0


# -- patch index <-> box -------------------------------------------------------------------------

@SETTINGS
@given(st.integers(0, 1023), st.integers(0, 1023))
def test_patch_index_to_box_matches_transformers(ul: int, lr: int) -> None:
    assert patch_index_to_box(ul, lr) == patch_index_to_coordinate(ul, lr, 32)


@pytest.mark.parametrize("per_side", [4, 8, 32])
def test_patch_index_to_box_exhaustive_small_grids(per_side: int) -> None:
    n = per_side * per_side
    step = 1 if per_side <= 8 else 7
    for ul in range(0, n, step):
        for lr in range(0, n, step):
            assert patch_index_to_box(ul, lr, per_side) == patch_index_to_coordinate(ul, lr, per_side)


BOX_COORD = st.floats(0.0, 1.0, allow_nan=False)


@SETTINGS
@given(BOX_COORD, BOX_COORD, BOX_COORD, BOX_COORD, st.sampled_from([8, 32]))
def test_box_to_patch_index_matches_transformers(x0: float, y0: float, x1: float, y1: float, per_side: int) -> None:
    box = (x0, y0, x1, y1)
    try:
        ref = coordinate_to_patch_index(box, per_side)
    except ValueError:
        with pytest.raises(ValueError):
            box_to_patch_index(box, per_side)
        return
    assert box_to_patch_index(box, per_side) == ref


@SETTINGS
@given(st.integers(0, 1023), st.integers(0, 1023))
def test_box_round_trip(ul: int, lr: int) -> None:
    """Cells -> box -> cells returns the same cells whenever the box is a proper box."""
    box = patch_index_to_box(ul, lr)
    (ux, uy), (lx, ly) = (ul % 32, ul // 32), (lr % 32, lr // 32)
    if ux <= lx and uy <= ly:
        assert box_to_patch_index(box) == (ul, lr) == coordinate_to_patch_index(box, 32)
    else:
        with pytest.raises(ValueError):
            box_to_patch_index(box)


@SETTINGS
@given(BOX_COORD, BOX_COORD, BOX_COORD, BOX_COORD)
def test_box_to_cells_and_back_covers_the_box_centre(x0: float, y0: float, x1: float, y1: float) -> None:
    # Degenerate boxes narrower than float resolution near 0 wrap around (x1 * 32 - 1 == -1.0),
    # in transformers too; the property is about real boxes.
    if not (x1 - x0 > 1e-9 and y1 - y0 > 1e-9):
        return
    back = patch_index_to_box(*box_to_patch_index((x0, y0, x1, y1)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # The decoded box lies within a cell of the original on every side.
    for got, want in zip(back, (x0, y0, x1, y1)):
        assert abs(got - want) <= 1 / 32 + 1e-12
    assert back[0] - 1 / 32 <= cx <= back[2] + 1 / 32 and back[1] - 1 / 32 <= cy <= back[3] + 1 / 32


# A free-decoding generation seen on a tiny checkpoint: after the asked phrase's box the model
# rambles on through two more boxes of other "phrases".
RAMBLING_PROMPT = "<grounding>An image of a red square next to<phrase> a blue square</phrase>"
RAMBLING = (RAMBLING_PROMPT + "<object><patch_index_0309><patch_index_0510></object> is red square</phrase>"
            "<object><patch_index_0012><patch_index_0175></object> red square</phrase>"
            "<object><patch_index_0064><patch_index_0327></object>")


def test_prompt_phrase_entity_is_the_box_after_the_phrase_not_the_last() -> None:
    text = "</image>" + RAMBLING
    parsed = parse_generation(text)
    ent = prompt_phrase_entity(parsed, RAMBLING_PROMPT)
    assert ent is not None
    # transformers attaches 309/510 to the phrase; the generation's last box is 64/327.
    ref_text, ref_entities = reference(text)
    caption = "An image of a red square next to a blue square"
    asked = [e for e in ref_entities if e[1][1] == len(caption)]
    assert len(asked) == 1 and asked[0][0] == "a blue square"
    assert (ent.phrase, ent.span, ent.boxes_norm) == asked[0]
    assert ent.boxes_norm == [patch_index_to_box(309, 510)]
    assert parsed.entities[-1].boxes_norm != ent.boxes_norm


@pytest.mark.parametrize("generated", [
    "",                                                     # stopped at the phrase
    " and then<object><patch_index_0001><patch_index_0002></object>",   # a box, but not right after it
    "<phrase> other</phrase><object><patch_index_0001><patch_index_0002></object>",
])
def test_prompt_phrase_entity_none_when_the_phrase_got_no_box(generated: str) -> None:
    text = "</image>" + RAMBLING_PROMPT + generated
    ent = prompt_phrase_entity(parse_generation(text), RAMBLING_PROMPT)
    assert ent is None
    ref_entities = reference(text)[1]
    assert not [e for e in ref_entities if e[0] == "a blue square"]
