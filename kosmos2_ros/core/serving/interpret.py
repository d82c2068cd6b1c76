"""Stage 3, interpret: a command's generations -> its result as the model gave it, in normalised boxes.

Parsed text and entities (boxes, scores), the objects kept by `score_threshold`, presence, the
candidates kept (duplicates of a kept box dropped, cut to `max_candidates`), ambiguity, and the
"not found" decision, which drops objects and candidates before anything is computed for them.
Model outputs only: no pixels, no depth (`place` and `lift` come after).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

from ..model import grounding
from ..model.decoding import Generation
from ..model.grounding import box_iou
from ..model.loading import TextCodec
from ..model.tasks import Output, Task
from ..model.vocab import PATCH_TOKEN_RE
from .config import Kosmos2Config
from .frames import Frame
from .plan import Plan
from .results import GroundedBox, Result

#: Where a box's pixels go until `place` gives them.
UNPLACED = (math.nan, math.nan, math.nan, math.nan)


class Interpreter:
    """Generations -> results, with the config's thresholds."""

    def __init__(self, config: Kosmos2Config, codec: TextCodec) -> None:
        self.config, self.codec, self.vocab = config, codec, codec.vocab

    def interpret(self, plan: Plan, gens: List[Generation], frame: Frame) -> Result:
        """The result of `plan` from its generations (`frame`: only its stamp, id and size are read)."""
        cmd = plan.command
        res = Result(id=cmd.id, task=plan.spec.task.value, stamp_ns=frame.stamp_ns, frame_id=frame.frame_id,
                     width=frame.width, height=frame.height, no_repeat_ngram_size=plan.no_repeat_ngram_size,
                     camera=cmd.camera)
        outputs = []
        for pids, gen in zip(plan.ids, gens):
            full = pids.input_ids + gen.token_ids
            raw = self.codec.decode(full)
            parsed = grounding.parse_generation(raw, self.vocab.patches_per_side)
            grounding.attach_scores(parsed, self._patch_probs(pids.input_ids, gen, raw))
            outputs.append(Output(raw, parsed, self.codec.decode(pids.input_ids)))
            res.token_ids.extend(gen.token_ids)
            res.prompt_ids.extend(pids.input_ids)
            res.model_calls += gen.model_calls
        merged = plan.spec.merge(plan.text, outputs)
        res.text, res.raw_text, res.entities = merged.text, merged.raw_text, merged.entities
        self._objects(res)
        presences = [g.presence for p, g in zip(plan.prompts, gens) if p.expects_box and g.presence is not None]
        if presences:
            res.presence = float(min(presences))
        answers = [g.answer_probability for g in gens if g.answer_probability is not None]
        if answers and math.isfinite(answers[0]):      # NaN: the model gave neither answer any weight
            res.answer_probability = float(answers[0])
            res.answer = "yes" if res.answer_probability >= 0.5 else "no"
        self._candidates(res, plan, gens)
        self._not_found(res, plan)
        return res

    def _objects(self, res: Result) -> None:
        """Every entity's boxes that pass `score_threshold` (a box without a score passes), in order."""
        for index, ent in enumerate(res.entities):
            if len(ent.scores) != len(ent.boxes_norm):
                ent.scores = [float("nan")] * len(ent.boxes_norm)
            for k, (box_norm, score) in enumerate(zip(ent.boxes_norm, ent.scores)):
                if not math.isnan(score) and score < self.config.score_threshold:
                    continue
                res.objects.append(GroundedBox(ent.phrase, index, ent.span, UNPLACED, tuple(box_norm), score,
                                               box_index=k))

    def _candidates(self, res: Result, plan: Plan, gens: List[Generation]) -> None:
        """Other boxes the model considered, duplicates of a kept box (IoU >= 0.5) dropped, best first,
        at most `max_candidates`; and how close the best came to the chosen box."""
        lo = self.vocab.patch_ids()[0]
        grid = self.vocab.patches_per_side
        kept = [o.box_norm for o in res.objects]
        found: List[Tuple[float, GroundedBox]] = []
        for index, (prompt, gen) in enumerate(zip(plan.prompts, gens)):
            phrase = res.entities[index].phrase if index < len(res.entities) and prompt.expects_box else plan.text
            for cand in gen.candidates:
                box_norm = grounding.patch_index_to_box(cand.first - lo, cand.second - lo, grid)
                if any(box_iou(box_norm, k) >= 0.5 for k in kept):
                    continue
                kept.append(box_norm)
                found.append((cand.score, GroundedBox(phrase, index, (0, 0), UNPLACED, tuple(box_norm), cand.score)))
        found.sort(key=lambda f: -f[0])
        res.candidates = [box for _, box in found[:plan.max_candidates]]
        chosen = max((o.score for o in res.objects if o.score == o.score), default=0.0)
        if res.candidates and chosen > 0:
            res.ambiguity = float(res.candidates[0].score / chosen)
        res.ambiguous = bool(res.candidates) and res.ambiguity >= self.config.ambiguity_ratio

    def _not_found(self, res: Result, plan: Plan) -> None:
        """A refer result with no object says why (presence below its threshold, or every box below score_threshold)."""
        if plan.spec.task is not Task.REFER:
            return
        cfg = self.config
        if 0 <= res.presence < cfg.presence_threshold:
            res.not_found_reason = f"presence {res.presence:.2f} < presence_threshold {cfg.presence_threshold:g}"
            res.objects, res.candidates, res.ambiguous, res.ambiguity = [], [], False, 0.0
        elif not res.objects and any(e.boxes_norm for e in res.entities):
            res.not_found_reason = f"every box scored below score_threshold {cfg.score_threshold:g}"
        elif not res.objects:
            res.not_found_reason = "the model placed no box"

    def _patch_probs(self, prompt_ids: List[int], gen: Generation, raw: str) -> List[Optional[float]]:
        """Probability of each location token in the parsed text, in order (None: from the prompt)."""
        eoi_at = max((i for i, t in enumerate(prompt_ids) if t == self.vocab.eoi), default=-1)
        probs: List[Optional[float]] = [None for t in prompt_ids[eoi_at + 1:] if self.vocab.is_patch(t)]
        probs += [p for t, p in zip(gen.token_ids, gen.probs) if self.vocab.is_patch(t)]
        in_text = len(PATCH_TOKEN_RE.findall(raw.split(grounding.EOI)[-1]))
        return probs if in_text == len(probs) else []
