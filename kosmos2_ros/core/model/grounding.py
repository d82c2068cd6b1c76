"""Generated Kosmos-2 text -> clean text and grounded entities; patch indices <-> boxes.

The parsing rules are those of transformers' `Kosmos2Processor.post_process_generation`
(itself from the paper's demo code), re-implemented here so that each box also knows which
location tokens produced it (for its score). `test/test_grounding.py` property-tests the two
against each other, malformed text included.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from .vocab import PATCH_TOKEN_RE

#: (x0, y0, x1, y1): normalised on the model input, or pixels (the one box type of the package).
Box = Tuple[float, float, float, float]

EOI = "</image>"
_ENTITY_RE = re.compile(
    r"(?:(<phrase>([^<]+)</phrase>))?<object>((?:<patch_index_\d+><patch_index_\d+>"
    r"</delimiter_of_multi_objects/>)*<patch_index_\d+><patch_index_\d+>)</object>"
)
_TAG_RE = re.compile("<.*?>")


#: Kosmos-2's location grid: boxes are cells of a GRID x GRID grid over the model's input image.
GRID = 32


@dataclass
class Entity:
    """A grounded phrase: its text, its character span in the clean text, and its boxes."""
    phrase: str
    span: Tuple[int, int]
    boxes_norm: List[Box]
    # Index (in the order they appear in the parsed text) of each box's two location tokens.
    patch_occurrences: List[Tuple[int, int]] = field(default_factory=list)
    scores: List[float] = field(default_factory=list)
    boxes_px: List[Box] = field(default_factory=list)


@dataclass
class ParsedText:
    text: str
    entities: List[Entity]

    def as_reference(self) -> Tuple[str, list]:
        """The shape `post_process_generation` returns, for comparisons."""
        return self.text, [(e.phrase, e.span, list(e.boxes_norm)) for e in self.entities]


def box_area(box: Sequence[float]) -> float:
    """Area of a corners box; a box with x1 < x0 or y1 < y0 has area 0."""
    x0, y0, x1, y1 = box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two corners boxes; 0 when the union is empty (two zero-area boxes).

    Boxes are taken as given: one outside the image still has its area (nothing is clipped), as
    in the paper's scripts; zero-area boxes (the paper's stand-in for "no box") score 0.
    """
    if not all(math.isfinite(float(v)) for v in (*a, *b)):
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = box_area(a) + box_area(b) - inter
    return float(inter / union) if union > 0 else 0.0


def patch_index_to_box(ul_idx: int, lr_idx: int, per_side: int = GRID) -> Box:
    """Normalised box of the cells `ul_idx` (upper-left) and `lr_idx` (lower-right).

    As in the paper's decoder: cell centres, or whole cells when the two share a row or column.
    """
    cell = 1.0 / per_side
    ul_x, ul_y = ul_idx % per_side, ul_idx // per_side
    lr_x, lr_y = lr_idx % per_side, lr_idx // per_side
    if ul_idx == lr_idx or ul_x == lr_x or ul_y == lr_y:
        return (ul_x * cell, ul_y * cell, lr_x * cell + cell, lr_y * cell + cell)
    return (ul_x * cell + cell / 2, ul_y * cell + cell / 2, lr_x * cell + cell / 2, lr_y * cell + cell / 2)


def box_to_patch_index(box: Box, per_side: int = GRID) -> Tuple[int, int]:
    """Normalised (x0, y0, x1, y1) -> (upper-left, lower-right) cell indices, as the processor does."""
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise ValueError("a box needs x1 > x0 and y1 > y0")
    ul = math.floor(y0 * per_side) * per_side + math.floor(x0 * per_side)
    lr = math.ceil(y1 * per_side - 1) * per_side + math.ceil(x1 * per_side - 1)
    return ul, lr


def _strip_tags_len(text: str) -> int:
    return len(_TAG_RE.sub("", text))


def parse_generation(text: str, per_side: int = GRID) -> ParsedText:
    """Parse decoded text (the part after `</image>` is used, as transformers does)."""
    text = text.split(EOI)[-1]
    # Global occurrence index of every <patch_index_…> by its start offset.
    occurrence = {m.start(): i for i, m in enumerate(PATCH_TOKEN_RE.finditer(text))}

    raw_entities = []
    for match in _ENTITY_RE.finditer(text):
        phrase_tag, phrase, content = match.groups()
        span = match.span(2)
        if not phrase_tag:
            phrase = None
            span = (match.start(0), match.start(0))
        content_start = match.start(3)
        pairs = []
        offset = content_start
        for pair in content.split("</delimiter_of_multi_objects/>"):
            # As transformers: the first index anywhere in the pair, the second from pair[1:].
            first = PATCH_TOKEN_RE.search(pair)
            second = PATCH_TOKEN_RE.search(pair, 1)
            if first and second:
                pairs.append(((int(first.group(1)), int(second.group(1))),
                              (occurrence.get(offset + first.start(), -1), occurrence.get(offset + second.start(), -1))))
            offset += len(pair) + len("</delimiter_of_multi_objects/>")
        if phrase:
            raw_entities.append((phrase, span, pairs))
        else:
            for (ul, lr), occ in pairs:
                raw_entities.append((f"<patch_index_{ul}><patch_index_{lr}>", span, [((ul, lr), occ)]))

    clean = _TAG_RE.sub("", text)
    leading = len(clean) - len(clean.lstrip())
    entities = []
    for name, (start, end), pairs in raw_entities:
        start_adj = _strip_tags_len(text[:start])
        end_adj = _strip_tags_len(text[:end])
        lead = len(name) - len(name.lstrip())
        trail = len(name) - len(name.rstrip())
        entities.append(Entity(
            phrase=name.strip(),
            span=(start_adj - leading + lead, end_adj - leading - trail),
            boxes_norm=[patch_index_to_box(ul, lr, per_side) for (ul, lr), _ in pairs],
            patch_occurrences=[occ for _, occ in pairs],
        ))
    return ParsedText(text=clean.strip(), entities=entities)


def prompt_phrase_entity(parsed: ParsedText, prompt_text: str) -> Optional[Entity]:
    """The entity of the phrase a prompt ends with (`...<phrase> x</phrase>`), or None.

    That is the entity `post_process_generation` attaches to the phrase: the boxes generated
    right after it, not the last ones of a generation that rambles on to other phrases. It is
    found by where the phrase ends in the clean text, which generation cannot move.
    """
    clean = _TAG_RE.sub("", prompt_text.split(EOI)[-1])
    end = len(clean.rstrip()) - (len(clean) - len(clean.lstrip()))
    return next((e for e in parsed.entities if e.span[1] == end and e.span[0] < end), None)


def attach_scores(parsed: ParsedText, patch_probs: Sequence[Optional[float]]) -> None:
    """Score each box with p(upper-left token) * p(lower-right token).

    `patch_probs[k]` is the probability the model gave the k-th location token of the parsed
    text when it generated it, or None for location tokens that came from the prompt (a
    region description's input box); those, and boxes whose tokens cannot be found, score 1.0
    and NaN respectively.
    """
    for entity in parsed.entities:
        entity.scores = []
        for first, second in entity.patch_occurrences:
            if not (0 <= first < len(patch_probs) and 0 <= second < len(patch_probs)):
                entity.scores.append(float("nan"))
                continue
            p1, p2 = patch_probs[first], patch_probs[second]
            entity.scores.append(float((1.0 if p1 is None else p1) * (1.0 if p2 is None else p2)))
