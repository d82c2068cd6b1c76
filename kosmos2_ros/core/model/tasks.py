"""The Kosmos-2 tasks as specs (`TASKS`), and the guard that keeps user text plain text.

Each task is one `TaskSpec`: whether it needs text or a region, its prompts (one or several
generations), and how their outputs merge into one result. The pipeline has no per-task
branch, so a new task is one entry here plus its message constant.

Prompt formats follow the paper's evaluation and the transformers documentation. The
model sees `<grounding>` (ask for boxes) and phrase/object tags; user text must never be
able to add its own, so `sanitize_text` refuses any control token.
"""
from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .grounding import EOI, Box, Entity, ParsedText, prompt_phrase_entity

DEFAULT_MAX_PROMPT_CHARS = 1000
# Generic look of a control token (`<phrase>`, `</object>`, `<patch_index_0042>`, `</delimiter_of_multi_objects/>`)
# Rejecting the generic shape as well as the tokenizer's exact strings keeps near-misses that a
# tokenizer update could start matching out of the prompt.
_TAG_SHAPE = re.compile(
    r"<\s*/?\s*(?:phrase|object|grounding|image|patch_index_\w*|delimiter_of_multi_objects|doc|chunk|line|s|pad|unk|mask)\s*/?\s*>",
    re.IGNORECASE,
)


class Task(str, enum.Enum):
    REFER = "refer"                        # referring expression comprehension: text -> box(es)
    PHRASE_GROUNDING = "phrase_grounding"  # phrases marked [like this] in a caption -> a box each
    CAPTION = "caption"                    # brief grounded caption
    DESCRIBE = "describe"                  # detailed grounded description
    REGION = "region"                      # describe what is inside a given box
    VQA = "vqa"                            # grounded question answering (about the image, or a given region)
    CHECK = "check"                        # a yes/no question: the answer and p(yes) (about the image or a region)
    RAW = "raw"                            # expert: text follows <grounding> verbatim

    @classmethod
    def parse(cls, value: str) -> Task:
        value = (value or "refer").strip().lower()
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(t.value for t in cls)
            raise PromptError(f"unknown task {value!r}; expected one of: {names}") from None


class PromptError(ValueError):
    """A command that cannot become a prompt (empty, too long, control tokens, bad region)."""


@dataclass(frozen=True)
class Prompt:
    """What the processor turns into token ids: text with tags, and boxes to insert after phrases."""
    text: str
    # One entry per <phrase> in `text`: a normalised (x0, y0, x1, y1) on the model's input image.
    bboxes: Optional[List[Box]] = None
    # Decoding hint: the prompt ends in an open </phrase> whose box the model should produce.
    expects_box: bool = False


@dataclass(frozen=True)
class TaskRequest:
    task: Task
    text: str = ""
    # Region (REGION task) in normalised model-input coordinates, already mapped from pixels.
    region_norm: Optional[Box] = None
    extra: dict = field(default_factory=dict)


def sanitize_text(text: str, control_strings: Iterable[str] = (),
                  max_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> str:
    """User text -> plain prompt text, or PromptError saying why not.

    Whitespace runs (newlines, tabs) become single spaces; other control characters are refused,
    as are the tokenizer's control strings and anything shaped like one.
    """
    if not isinstance(text, str):
        raise PromptError("text must be a string")
    if len(text) > max_chars:
        raise PromptError(f"text is {len(text)} characters; the limit is {max_chars} (parameter max_prompt_chars)")
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co") and not ch.isspace():
            raise PromptError(f"text contains the control character U+{ord(ch):04X}")
    cleaned = " ".join(text.split())
    # Also look at the NFKC form: a tokenizer that normalises before matching its added tokens
    # (SentencePiece's nmt_nfkc) would read fullwidth '＜phrase＞' as '<phrase>'.
    folded = " ".join(unicodedata.normalize("NFKC", cleaned).split())
    found = _TAG_SHAPE.search(cleaned) or _TAG_SHAPE.search(folded)
    if found:
        raise PromptError(f"text contains the control token {found.group(0)!r}; Kosmos-2 tags cannot be sent as text")
    for token in control_strings:
        if token and (token in cleaned or token in folded):
            raise PromptError(f"text contains the control token {token!r}; Kosmos-2 tags cannot be sent as text")
    return cleaned


#: A [bracketed] phrase: phrase grounding's phrases, the phrase a region question or standing check is about.
MARKED = re.compile(r"\[([^\[\]]*)\]")


def _marked_parts(caption: str) -> List[str]:
    """[outside, phrase, outside, phrase, ..., outside]; PromptError for nested or unbalanced brackets."""
    parts = MARKED.split(caption)
    # Text outside the [phrases] must hold no brackets: nested or unbalanced ones are a mistake.
    if any("[" in part or "]" in part for part in parts[0::2]):
        raise PromptError("unbalanced or nested [brackets] in phrase_grounding text")
    return parts


def split_marked_phrases(caption: str) -> List[Tuple[str, str]]:
    """'A man [walking a dog] on [the beach]' -> [('A man', 'walking a dog'), (' on', 'the beach')].

    Each pair is (text before the phrase since the previous phrase, the phrase). Text without
    brackets is one phrase.
    """
    parts = _marked_parts(caption)
    if len(parts) == 1:
        return [("", caption.strip())]
    pairs = []
    for i in range(1, len(parts), 2):
        pairs.append((parts[i - 1], parts[i].strip()))
    if any(not p for _, p in pairs):
        raise PromptError("an empty [phrase] in phrase_grounding text")
    return pairs


def unmarked_caption(caption: str) -> str:
    """'A man [walking a dog] on [the beach].' -> 'A man walking a dog on the beach.' (spaces collapsed)."""
    return " ".join("".join(_marked_parts(caption)).split())


def phrase_prompt(expression: str, context: str = "") -> Prompt:
    """`<grounding>{context}<phrase> {expression}</phrase>`: the model answers with its box."""
    context = context.rstrip()
    return Prompt(text=f"<grounding>{context}<phrase> {expression}</phrase>", expects_box=True)


# -- the tasks ------------------------------------------------------------------------------------
@dataclass
class Output:
    """One prompt's generation, parsed: what a task's merge combines into the result."""
    raw: str                # prompt + generation as text, image tokens dropped (after `</image>`)
    parsed: ParsedText      # clean text and entities of `raw`
    prompt: str             # the prompt's own text (tags kept), after `</image>`


@dataclass
class Merged:
    text: str
    raw_text: str
    entities: List[Entity]


def _region_prompts(text: str, region: Optional[Box]) -> List[Prompt]:
    if region is None:
        raise PromptError("task 'region' needs a region (use_region and region in pixels)")
    x0, y0, x1, y1 = region
    if not (x1 > x0 and y1 > y0):
        raise PromptError("region is empty after clipping to the image")
    return [Prompt(text="<grounding><phrase> It</phrase> is", bboxes=[(float(x0), float(y0), float(x1), float(y1))])]


#: Words a question about a region may point at it with, when no phrase is [bracketed]: the paper's
#: referring examples ask "What is this?", "What is it used for?".
POINTING_WORDS = ("this", "that", "it", "these", "those", "here")
_POINTING = re.compile(r"\b(" + "|".join(POINTING_WORDS) + r")\b", re.IGNORECASE)


def linked_phrase(question: str) -> Tuple[str, str, str]:
    """(before, phrase, after): the phrase of a question about a region that the region is linked to.

    The phrase is the one [bracketed] ("Is [the mug] in the gripper?"); with no brackets, the first
    pointing word ("What is this used for?" -> "this"). PromptError when there is none, or more than one
    bracketed phrase (one region, one phrase).
    """
    parts = _marked_parts(question)
    if len(parts) > 3:
        raise PromptError("a question about a region links one phrase to it: [bracket] only one")
    if len(parts) == 3:
        if not parts[1].strip():
            raise PromptError("an empty [phrase] in the question")
        return parts[0], parts[1].strip(), parts[2]
    found = _POINTING.search(question)
    if found is None:
        raise PromptError("a question about a region needs the phrase the region is: [bracket] it, as in "
                          "'Is [the drawer] open?', or point at it with this, that or it ('What is this?')")
    return question[:found.start()], found.group(0), question[found.end():]


def question_prompt(question: str, region: Optional[Box] = None) -> Prompt:
    """`<grounding> Question: {question} Answer:`; about a region, its linked phrase tagged as the model writes
    phrases (the space before it inside: `What is<phrase> this</phrase> used for?`) with the region's box,
    which the processor inserts after the phrase as `<object><patch_index_a><patch_index_b></object>`."""
    if region is None:     # [brackets] link a phrase to a region; with none they are not part of the question
        try:
            question = unmarked_caption(question)
        except PromptError:
            pass           # unbalanced: the text as written
        return Prompt(text=f"<grounding> Question: {question} Answer:")
    x0, y0, x1, y1 = region
    if not (x1 > x0 and y1 > y0):
        raise PromptError("region is empty after clipping to the image")
    before, phrase, after = linked_phrase(question)
    text = f"<grounding> Question:{(' ' + before.strip()) if before.strip() else ''}<phrase> {phrase}</phrase>{after}"
    return Prompt(text=f"{text.rstrip()} Answer:", bboxes=[(float(x0), float(y0), float(x1), float(y1))])


def _phrase_prompts(text: str, region: Optional[Box]) -> List[Prompt]:
    """One prompt per marked phrase, each after the caption so far (brackets removed, spaces as written)."""
    prompts = []
    caption = ""
    for before, phrase in split_marked_phrases(text):
        caption += before
        prompts.append(phrase_prompt(phrase, " ".join(caption.split())))
        caption += phrase
    return prompts


def merge_single(text: str, outputs: List[Output]) -> Merged:
    """A one-prompt task: the generation's own clean text and entities."""
    out = outputs[0]
    return Merged(out.parsed.text, out.raw.split(EOI)[-1], out.parsed.entities)


def merge_phrases(text: str, outputs: List[Output]) -> Merged:
    """One entity per asked phrase, named and placed as the user wrote it in the caption."""
    caption = unmarked_caption(text)
    phrases = [p for _, p in split_marked_phrases(text)]
    entities: List[Entity] = []
    cursor = 0
    for phrase, out in zip(phrases, outputs):
        ent = prompt_phrase_entity(out.parsed, out.prompt)
        if ent is None:
            continue
        ent.phrase = phrase
        start = caption.find(phrase, cursor)
        if start >= 0:
            ent.span = (start, start + len(phrase))
            cursor = start + len(phrase)
        entities.append(ent)
    return Merged(caption, "\n".join(out.raw.split(EOI)[-1] for out in outputs), entities)


@dataclass(frozen=True)
class TaskSpec:
    """Everything one task is: what it needs, its prompts, how their outputs merge."""
    task: Task
    prompts: Callable[[str, Optional[Box]], List[Prompt]]   # (sanitised text, region on the model input)
    needs_text: bool = False
    needs_region: bool = False
    accepts_region: bool = False     # a region is optional (questions about an object); read when given
    yes_no: bool = False             # the answer is read as yes or no, with p(yes) (Generation.answer_probability)
    merge: Callable[[str, List[Output]], Merged] = merge_single   # (the command's sanitised text, outputs)


def _fixed(text: str) -> Callable[[str, Optional[Box]], List[Prompt]]:
    return lambda _text, _region: [Prompt(text=text)]


TASKS: Dict[Task, TaskSpec] = {spec.task: spec for spec in (
    TaskSpec(Task.REFER, lambda text, _: [phrase_prompt(text)], needs_text=True),
    TaskSpec(Task.PHRASE_GROUNDING, _phrase_prompts, needs_text=True, merge=merge_phrases),
    TaskSpec(Task.CAPTION, _fixed("<grounding>An image of")),
    TaskSpec(Task.DESCRIBE, _fixed("<grounding>Describe this image in detail:")),
    TaskSpec(Task.REGION, _region_prompts, needs_region=True),
    TaskSpec(Task.VQA, lambda text, region: [question_prompt(text, region)], needs_text=True, accepts_region=True),
    TaskSpec(Task.CHECK, lambda text, region: [question_prompt(text, region)], needs_text=True, accepts_region=True,
             yes_no=True),
    TaskSpec(Task.RAW, lambda text, _: [Prompt(text=f"<grounding>{text}")], needs_text=True),
)}
#: Tasks whose command must carry text.
TASKS_NEEDING_TEXT = frozenset(t for t, spec in TASKS.items() if spec.needs_text)


def build_prompts(request: TaskRequest, control_strings: Sequence[str] = (),
                  max_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> List[Prompt]:
    """One prompt per generation the task needs (phrase grounding: one per marked phrase)."""
    spec = TASKS[request.task]
    text = sanitize_text(request.text or "", control_strings, max_chars)
    if spec.needs_text and not text:
        raise PromptError(f"task {request.task.value!r} needs non-empty text")
    return spec.prompts(text, request.region_norm)
