"""Stage 6, describe (optional second pass): each box of an ambiguous result described in words.

So a person can be asked which one. All of a frame's boxes to describe become region commands,
decoded as one batch on the frame's encoding by the same stages; a description that cannot be
made leaves the text empty, never the result.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from .plan import Plan
from .results import Command, GroundedBox, Result, Status

#: Tokens a candidate's description may take (a short phrase: "a red mug next to the laptop").
DESCRIBE_TOKENS = 24


def boxes_to_describe(plans: Sequence[Plan], results: Sequence[Optional[Result]]) -> List[GroundedBox]:
    """The chosen box and the candidates of every OK, ambiguous result whose command asked for descriptions."""
    boxes: List[GroundedBox] = []
    for plan, res in zip(plans, results):
        if res is not None and res.status is Status.OK and plan.describe_candidates and res.ambiguous:
            boxes += res.objects[:1] + res.candidates
    return boxes


def region_commands(boxes: Sequence[GroundedBox], max_new_tokens_limit: int) -> List[Command]:
    """A free-decoded region description per box, within what the node allows a command."""
    tokens = min(DESCRIBE_TOKENS, max_new_tokens_limit)
    return [Command(id=f"describe-{k}", task="region", region_px=tuple(b.box_px), max_new_tokens=tokens,
                    decoding="free", max_candidates=0, describe_candidates=0) for k, b in enumerate(boxes)]


def described_as(region_text: str) -> str:
    """A region description's text ("It is a red mug next to the laptop.") as a short description of
    the box ("a red mug next to the laptop")."""
    text = region_text.strip()
    for lead in ("It is ", "It "):
        if text.startswith(lead):
            text = text[len(lead):]
            break
    return text.rstrip(". ").strip()
