"""Prompt formats of every Kosmos-2 task, and user text that must never become control tokens."""
from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kosmos2_ros.core.model.tasks import (
    DEFAULT_MAX_PROMPT_CHARS,
    TASKS,
    PromptError,
    Task,
    TaskRequest,
    build_prompts,
    sanitize_text,
    split_marked_phrases,
)
from kosmos2_ros.core.model.vocab import TAG_TOKENS, patch_token


def prompts(task: Task, text: str = "", region=None, **kw):
    return build_prompts(TaskRequest(task=task, text=text, region_norm=region), **kw)


# -- formats (paper evaluation and transformers documentation) ------------------------------------

def test_refer_prompt() -> None:
    (p,) = prompts(Task.REFER, "a red mug")
    assert p.text == "<grounding><phrase> a red mug</phrase>"
    assert p.expects_box and p.bboxes is None


def test_caption_and_describe_prompts() -> None:
    assert [p.text for p in prompts(Task.CAPTION)] == ["<grounding>An image of"]
    assert [p.text for p in prompts(Task.DESCRIBE)] == ["<grounding>Describe this image in detail:"]
    assert not prompts(Task.CAPTION)[0].expects_box


def test_caption_ignores_text() -> None:
    assert [p.text for p in prompts(Task.CAPTION, "whatever")] == ["<grounding>An image of"]


def test_vqa_prompt() -> None:
    (p,) = prompts(Task.VQA, "What is on the left?")
    assert p.text == "<grounding> Question: What is on the left? Answer:"


def test_region_prompt_carries_the_box() -> None:
    (p,) = prompts(Task.REGION, region=(0.1, 0.2, 0.5, 0.75))
    assert p.text == "<grounding><phrase> It</phrase> is"
    assert p.bboxes == [(0.1, 0.2, 0.5, 0.75)]


@pytest.mark.parametrize("region", [None, (0.5, 0.2, 0.5, 0.7), (0.5, 0.7, 0.6, 0.2), (0.0, 0.0, 0.0, 0.0)])
def test_region_needs_a_proper_region(region) -> None:
    with pytest.raises(PromptError):
        prompts(Task.REGION, region=region)


def test_raw_prompt_follows_grounding_verbatim() -> None:
    assert [p.text for p in prompts(Task.RAW, "An image of a dog and")] == ["<grounding>An image of a dog and"]


def test_phrase_grounding_one_prompt_per_marked_phrase() -> None:
    ps = prompts(Task.PHRASE_GROUNDING, "A man [walking a dog] on [the beach], warming up by [a fire].")
    assert [p.text for p in ps] == [
        "<grounding>A man<phrase> walking a dog</phrase>",
        "<grounding>A man walking a dog on<phrase> the beach</phrase>",
        "<grounding>A man walking a dog on the beach, warming up by<phrase> a fire</phrase>",
    ]
    assert all(p.expects_box for p in ps)


def test_phrase_grounding_without_brackets_is_one_phrase() -> None:
    assert [p.text for p in prompts(Task.PHRASE_GROUNDING, "the blue box")] == [
        "<grounding><phrase> the blue box</phrase>"]


def test_phrase_grounding_first_phrase_at_start_and_adjacent_phrases() -> None:
    ps = prompts(Task.PHRASE_GROUNDING, "[a cat][a dog]")
    assert [p.text for p in ps] == ["<grounding><phrase> a cat</phrase>", "<grounding>a cat<phrase> a dog</phrase>"]


@pytest.mark.parametrize("text,pairs", [
    ("A man [walking a dog] on [the beach]", [("A man ", "walking a dog"), (" on ", "the beach")]),
    ("[ spaced ]", [("", "spaced")]),
    ("no brackets", [("", "no brackets")]),
])
def test_split_marked_phrases(text: str, pairs) -> None:
    assert split_marked_phrases(text) == pairs


@pytest.mark.parametrize("text", ["a [] b", "a [  ] b", "a [dog", "a dog]", "[a [b] c]", "x ] [y"])
def test_bad_brackets_are_refused(text: str) -> None:
    with pytest.raises(PromptError):
        prompts(Task.PHRASE_GROUNDING, text)


@pytest.mark.parametrize("task", [Task.REFER, Task.PHRASE_GROUNDING, Task.VQA, Task.RAW])
@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_tasks_needing_text_refuse_empty_text(task: Task, text: str) -> None:
    with pytest.raises(PromptError, match="non-empty"):
        prompts(task, text)


def test_task_parse() -> None:
    assert Task.parse("refer") is Task.REFER
    assert Task.parse(" Phrase_Grounding ") is Task.PHRASE_GROUNDING
    assert Task.parse("") is Task.REFER
    for t in Task:
        assert Task.parse(t.value) is t
    with pytest.raises(PromptError, match="unknown task 'segment'.*refer"):
        Task.parse("segment")


# -- user text stays plain text ------------------------------------------------------------------

INJECTIONS = [
    "<phrase>", "</phrase>", "<object>", "</object>", "<patch_index_0042>", "<patch_index_42>", "<patch_index_>",
    "<grounding>", "<image>", "</image>", "</delimiter_of_multi_objects/>", "<s>", "</s>", "<pad>", "<unk>",
    "</doc>", "</chunk>", "</line>", "<mask>",
    # odd case and whitespace
    "<PHRASE>", "</Object>", "<Patch_Index_0001>", "< phrase >", "</ object>", "<\tgrounding>", "<grounding\n>",
    "< / s >", "<S>", "</delimiter_of_multi_objects />",
    # forms that Unicode normalisation (NFKC) turns into tags
    "\uff1cphrase\uff1e", "<\uff50hrase>", "\ufe64object\ufe65",
]


@pytest.mark.parametrize("tag", INJECTIONS)
@pytest.mark.parametrize("task", [Task.REFER, Task.PHRASE_GROUNDING, Task.VQA, Task.RAW, Task.CAPTION])
def test_control_tokens_are_refused(task: Task, tag: str) -> None:
    for text in (tag, f"a dog {tag}", f"x{tag}y"):
        with pytest.raises(PromptError, match="control"):
            prompts(task, text)


def test_the_tokenizers_control_strings_are_refused() -> None:
    extra = ["<custom_tag>", "[[special]]"]
    with pytest.raises(PromptError, match="control token"):
        sanitize_text("a [[special]] thing", control_strings=extra)
    assert sanitize_text("a special thing", control_strings=extra) == "a special thing"


@pytest.mark.parametrize("ch", ["\x00", "\x07", "\x1b", "\x7f", "\u200b", "\u200e", "\ufeff", "\ue000", "\ud800",
                                "\u202e"])
def test_control_characters_are_refused(ch: str) -> None:
    with pytest.raises(PromptError, match="control character"):
        sanitize_text(f"a{ch}dog")
    with pytest.raises(PromptError):
        prompts(Task.REFER, f"a dog{ch}")


def test_whitespace_is_collapsed() -> None:
    assert sanitize_text("  a\tred\n\r mug  ") == "a red mug"
    assert prompts(Task.REFER, "a\n red\tmug")[0].text == "<grounding><phrase> a red mug</phrase>"


def test_harmless_angle_brackets_and_unicode_pass() -> None:
    for text in ("x < y > z", "a <b> c", "1 <= 2", "猫と犬 🙂", "café <3", "<patch>", "<phrases>"):
        assert sanitize_text(text) == text


def test_length_limit() -> None:
    ok = "a" * DEFAULT_MAX_PROMPT_CHARS
    assert sanitize_text(ok) == ok
    with pytest.raises(PromptError, match="limit"):
        sanitize_text(ok + "a")
    with pytest.raises(PromptError, match="limit is 10"):
        prompts(Task.REFER, "x" * 11, max_chars=10)
    with pytest.raises(PromptError, match="limit"):
        prompts(Task.REFER, "x" * 100_000)


def test_non_string_text_is_refused() -> None:
    with pytest.raises(PromptError):
        sanitize_text(b"bytes")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=6), st.sampled_from(list(TAG_TOKENS) + [patch_token(7), "<s>", "</s>"])),
                max_size=8).map("".join))
def test_accepted_text_never_holds_a_tag(text: str) -> None:
    """Whatever passes sanitising holds no tag of any case, in the raw or NFKC form."""
    try:
        clean = sanitize_text(text)
    except PromptError:
        return
    for form in (clean, unicodedata.normalize("NFKC", clean)):
        low = form.lower()
        for tag in list(TAG_TOKENS) + ["<patch_index_", "<s>", "</s>"]:
            assert tag not in low


# -- questions about a region, yes/no checks ---------------------------------------------------
@pytest.mark.parametrize("question, linked", [
    ("What is [this] used for?", ("What is ", "this", " used for?")),
    ("Is [the red mug] in the gripper?", ("Is ", "the red mug", " in the gripper?")),
    ("What is this?", ("What is ", "this", "?")),
    ("Is it open? Is this?", ("Is ", "it", " open? Is this?")),          # the first pointing word
    ("What colour is That", ("What colour is ", "That", "")),
])
def test_the_phrase_a_region_is_linked_to(question: str, linked: tuple) -> None:
    from kosmos2_ros.core.model.tasks import linked_phrase

    assert linked_phrase(question) == linked


@pytest.mark.parametrize("question, needle", [
    ("Is the drawer open?", "[bracket] it"),           # "this" inside a word does not count: "thistle"
    ("Is the thistle open?", "[bracket] it"),
    ("Is [a] in [b]?", "only one"),
    ("Is [ ] open?", "empty [phrase]"),
])
def test_a_question_without_one_linked_phrase_is_refused(question: str, needle: str) -> None:
    with pytest.raises(PromptError, match=re.escape(needle)):
        build_prompts(TaskRequest(Task.VQA, question, region_norm=(0.1, 0.1, 0.5, 0.5)))


def test_vqa_and_check_prompts_with_and_without_a_region() -> None:
    for task in (Task.VQA, Task.CHECK):
        (plain,) = build_prompts(TaskRequest(task, "Is [this] open?"))
        assert plain.text == "<grounding> Question: Is this open? Answer:" and plain.bboxes is None   # no region
        (about,) = build_prompts(TaskRequest(task, "Is [this] open?", region_norm=(0.1, 0.2, 0.5, 0.75)))
        assert about.text == "<grounding> Question: Is<phrase> this</phrase> open? Answer:"
        assert about.bboxes == [(0.1, 0.2, 0.5, 0.75)] and not about.expects_box
    assert TASKS[Task.CHECK].yes_no and not TASKS[Task.VQA].yes_no
