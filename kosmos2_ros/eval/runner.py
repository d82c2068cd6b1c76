"""Samples through a Pipeline into prediction records; resumable, never stopped by one bad sample.

Each image's samples go through `Pipeline.run_batch` together (one vision encoding, shared
prompt prefix). Records are appended to `predictions.jsonl` as they finish, so a stopped run
resumes where it stopped: samples already there are not run again.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from ..core.model import grounding
from ..core.serving.frames import Frame
from ..core.serving.pipeline import Command, Pipeline, Result, Status
from .datasets import REC, Dataset, Sample
from .metrics import candidate_ious, hit_at

#: The yes/no check asked beside each referring expression, on its own image and on another: a third
#: signal of "not there" beside presence and the box's score (metrics.not_there).
PRESENCE_QUESTION = "Is there {} in the image?"
PREDICTIONS = "predictions.jsonl"
#: What a record holds; a run resumed from records of another version would mix them (2: score and
#: yes_probability beside presence).
RECORDS_VERSION = 2
NEGATIVES = "negatives.jsonl"      # presence of each expression on another image of the set
RUN_FILE = "run.json"


class RunError(RuntimeError):
    """The run cannot go on (e.g. --out holds a run made with other settings)."""


@dataclass
class RunOutcome:
    records: List[dict]                       # every sample's record (resumed ones included), in dataset order
    skipped: Counter = field(default_factory=Counter)   # reason -> samples not evaluated in this run
    ran: int = 0                              # samples run now (not resumed)
    seconds: float = 0.0
    negatives: List[dict] = field(default_factory=list)   # referring expressions on another image: presence


def norm_text(text: str) -> str:
    return " ".join(text.split())


def command_for(sample: Sample) -> Command:
    """The paper's prompt: `<grounding><phrase> {expr}</phrase>` or `<grounding>{caption before}<phrase> {phrase}</phrase>`."""
    if sample.kind == REC:
        return Command(id=sample.id, task="refer", text=sample.query)

    def plain(text: str) -> str:   # brackets mark phrases in the phrase_grounding command text
        return text.replace("[", "(").replace("]", ")")

    return Command(id=sample.id, task="phrase_grounding", text=f"{plain(sample.context)} [{plain(sample.query)}]".strip())


def check_for(sample: Sample) -> Command:
    """The yes/no question whether the expression's object is in the image (PRESENCE_QUESTION)."""
    return Command(id=f"{sample.id}?", task="check", text=PRESENCE_QUESTION.format(sample.query), max_new_tokens=1)


def commands_for(samples: Sequence[Sample]) -> List[Command]:
    """Each sample's command, and for a referring expression its yes/no check after it."""
    out: List[Command] = []
    for s in samples:
        out.append(command_for(s))
        if s.kind == REC:
            out.append(check_for(s))
    return out


def paired(samples: Sequence[Sample], results: Sequence[Result]) -> List[Tuple[Sample, Result, Optional[Result]]]:
    """(sample, its result, its check's result or None), from `commands_for`'s order."""
    expected = sum(2 if s.kind == REC else 1 for s in samples)
    if len(results) != expected:
        raise RunError(f"{expected} commands gave {len(results)} results")
    out, it = [], iter(results)
    for s in samples:
        res = next(it)
        out.append((s, res, next(it) if s.kind == REC else None))
    return out


def yes_probability(check: Optional[Result]) -> Optional[float]:
    return round(float(check.answer_probability), 6) if check is not None and check.status is Status.OK \
        and check.answer_probability >= 0 else None


def top_score(result: Result) -> Optional[float]:
    """The chosen box's score (p of its two location tokens); 0 with no box; None when it has none (NaN)."""
    if not result.objects:
        return 0.0
    score = float(result.objects[0].score)
    return None if math.isnan(score) else round(score, 6)


def candidates(result: Result, sample: Sample, pipeline: Pipeline, frame: Frame) -> Tuple[List[list], List[float]]:
    """Boxes (pixels) and scores of the generated entities named as the query, in generation order."""
    want = norm_text(sample.query.replace("[", "(").replace("]", ")"))
    if sample.kind == REC:
        entities = result.entities
    else:
        # The pipeline names a phrase-grounding entity after the phrase asked; re-read the generated
        # text so the paper's rule (the entity the model wrote with that phrase) decides.
        entities = grounding.parse_generation(result.raw_text, pipeline.vocab.patches_per_side).entities
        geometry = pipeline.encode(frame).geometry
        asked = result.entities[0] if result.entities else None
        for ent in entities:
            ent.boxes_px = [geometry.to_pixels(b) for b in ent.boxes_norm]
            same = asked is not None and [tuple(b) for b in asked.boxes_norm] == [tuple(b) for b in ent.boxes_norm]
            ent.scores = list(asked.scores) if same else [float("nan")] * len(ent.boxes_norm)
    boxes, scores = [], []
    for ent in entities:
        if norm_text(ent.phrase) == want:
            boxes += [[round(float(v), 3) for v in b] for b in ent.boxes_px]
            scores += [float(s) for s in (ent.scores or [float("nan")] * len(ent.boxes_px))]
    return boxes, scores


def record_for(sample: Sample, result: Result, pipeline: Pipeline, frame: Frame,
               check: Optional[Result] = None) -> dict:
    boxes, scores = candidates(result, sample, pipeline, frame)
    ious = candidate_ious(boxes, sample.gt_boxes)
    which = {}
    if sample.kind == REC:   # the model's other candidate boxes, presence, the ambiguity flag, the three signals
        cand = [[round(float(v), 3) for v in c.box_px] for c in result.candidates]
        which = {"presence": round(float(result.presence), 6), "candidate_boxes_px": cand,
                 "candidate_iou": [round(v, 6) for v in candidate_ious(cand, sample.gt_boxes)],
                 "ambiguous": bool(result.ambiguous), "ambiguity": round(float(result.ambiguity), 6),
                 "score": top_score(result), "yes_probability": yes_probability(check)}
    return {"id": sample.id, "kind": sample.kind, "image": sample.image, **which,
            ("expression" if sample.kind == REC else "phrase"): sample.query, "context": sample.context,
            "boxes_px": boxes, "scores": [None if math.isnan(s) else round(s, 6) for s in scores],
            "gt_boxes": [[float(v) for v in b] for b in sample.gt_boxes],
            "iou": [round(v, 6) for v in ious], "hit": hit_at(ious, 1),
            "categories": list(sample.categories), "token_ids": list(result.token_ids),
            "image_size": [frame.width, frame.height]}


class Progress:
    """One self-rewriting stderr line: done/total, rate and ETA."""

    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None, every_s: float = 0.5) -> None:
        self.total, self.label, self.stream, self.every_s = total, label, stream or sys.stderr, every_s
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, done: int, ran: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.t0
        rate = ran / elapsed if elapsed > 0 else 0.0
        left = self.total - done
        eta = _clock(left / rate) if rate > 0 else "?"
        pct = 100.0 * done / self.total if self.total else 100.0
        end = "\n" if final else ""
        self.stream.write(f"\r[{self.label}] {done}/{self.total} {pct:5.1f}%  {rate:.2f} samples/s  "
                          f"ETA {eta}  elapsed {_clock(elapsed)}   {end}")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run_settings(pipeline: Pipeline, dataset: Dataset) -> Dict[str, Any]:
    """What decides the predictions; a resumed run must match it."""
    cfg = pipeline.config
    precision = getattr(pipeline.backend, "precision", cfg.precision)   # auto made concrete by the backend
    return {"records": RECORDS_VERSION, "dataset": dataset.label, "model": cfg.model, "backend": cfg.backend,
            "precision": precision,
            "decoding": cfg.decoding, "max_new_tokens": cfg.max_new_tokens,
            "no_repeat_ngram_size": pipeline.no_repeat_ngram_size()}


def load_existing(out: Path, settings: Dict[str, Any]) -> Dict[str, dict]:
    """Records of an earlier run in `out` with the same settings (a torn last line is dropped)."""
    run_file, pred_file = out / RUN_FILE, out / PREDICTIONS
    if run_file.is_file():
        try:
            before = json.loads(run_file.read_text()).get("settings", {})
        except ValueError:
            before = {}
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed and pred_file.is_file() and pred_file.stat().st_size:
            raise RunError(f"{out} holds predictions made with other settings ({', '.join(changed)} differ); "
                           "use another --out, or delete it to start over")
    records: Dict[str, dict] = {}
    if pred_file.is_file():
        good = []
        for line in pred_file.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                records[str(rec["id"])] = rec
                good.append(line)
            except (ValueError, KeyError, TypeError):
                continue   # a line cut short when the run was stopped: its sample runs again
        pred_file.write_text("".join(g + "\n" for g in good), encoding="utf-8")
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"settings": settings}, indent=2))
    return records


def run(pipeline: Pipeline, dataset: Dataset, out: Path, limit: int = 0, batch: int = 8,
        progress_stream: Optional[TextIO] = None, label: str = "eval", negatives: bool = True) -> RunOutcome:
    """Evaluate the first `limit` samples (0 = all) of `dataset`, appending to `out`/predictions.jsonl."""
    from ..cli import load_rgb

    samples = dataset.samples[:limit] if limit > 0 else list(dataset.samples)
    done = load_existing(out, run_settings(pipeline, dataset))
    pending: OrderedDict[str, List[Sample]] = OrderedDict()
    for s in samples:
        if s.id not in done:
            pending.setdefault(s.image, []).append(s)
    outcome = RunOutcome(records=[])
    progress = Progress(len(samples), label, progress_stream)
    finished = sum(1 for s in samples if s.id in done)
    t0 = time.perf_counter()
    with (out / PREDICTIONS).open("a", encoding="utf-8") as sink:
        for image, group in pending.items():
            try:
                rgb = load_rgb(image)
            except FileNotFoundError:
                outcome.skipped["missing image"] += len(group)
                finished += len(group)
                continue
            except (OSError, ValueError):
                outcome.skipped["unreadable image"] += len(group)
                finished += len(group)
                continue
            frame = Frame(rgb=rgb, frame_id=Path(image).name)
            for start in range(0, len(group), max(1, batch)):
                chunk = group[start:start + max(1, batch)]
                results = pipeline.run_batch(commands_for(chunk), frame)
                for sample, result, check in paired(chunk, results):
                    finished += 1
                    if result.status is Status.INVALID:
                        outcome.skipped["invalid expression"] += 1
                        continue
                    if result.status is not Status.OK:
                        outcome.skipped[f"{result.status.name.lower()} (runs again on resume)"] += 1
                        continue
                    rec = record_for(sample, result, pipeline, frame, check)
                    done[sample.id] = rec
                    sink.write(json.dumps(rec, allow_nan=False) + "\n")
                    sink.flush()
                    outcome.ran += 1
                progress.update(finished, outcome.ran)
    progress.update(finished, outcome.ran, final=True)
    outcome.records = [done[s.id] for s in samples if s.id in done]
    if negatives:
        outcome.negatives = run_negatives(pipeline, samples, out, batch)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def negative_pairs(samples: Sequence[Sample]) -> List[Tuple[Sample, str]]:
    """Each referring expression paired with another image of the set (the next one, in order): the
    object it names is almost surely absent there."""
    images = list(OrderedDict.fromkeys(s.image for s in samples if s.kind == REC))
    if len(images) < 2:
        return []
    other = {img: images[(i + 1) % len(images)] for i, img in enumerate(images)}
    return [(s, other[s.image]) for s in samples if s.kind == REC]


def run_negatives(pipeline: Pipeline, samples: Sequence[Sample], out: Path, batch: int) -> List[dict]:
    """presence, box score and the yes/no check of every expression on another image (negatives.jsonl;
    resumed like the predictions)."""
    from ..cli import load_rgb

    path = out / NEGATIVES
    done: Dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[rec["id"]] = rec
            except (ValueError, KeyError):
                continue
    by_image: OrderedDict[str, List[Sample]] = OrderedDict()
    for sample, image in negative_pairs(samples):
        if sample.id not in done:
            by_image.setdefault(image, []).append(sample)
    with path.open("a", encoding="utf-8") as sink:
        for image, group in by_image.items():
            try:
                frame = Frame(rgb=load_rgb(image), frame_id=Path(image).name)
            except (OSError, ValueError):
                continue
            for start in range(0, len(group), max(1, batch)):
                chunk = group[start:start + max(1, batch)]
                for sample, res, check in paired(chunk, pipeline.run_batch(commands_for(chunk), frame)):
                    if res.status is Status.OK:
                        rec = {"id": sample.id, "expression": sample.query, "image": image,
                               "presence": round(float(res.presence), 6), "score": top_score(res),
                               "yes_probability": yes_probability(check)}
                        done[sample.id] = rec
                        sink.write(json.dumps(rec) + "\n")
    return [done[s.id] for s, _ in negative_pairs(samples) if s.id in done]


def compare_records(a: Sequence[dict], b: Sequence[dict], threshold: float = 0.5) -> Dict[str, Any]:
    """Two runs on the same samples: top boxes agreeing (IoU >= threshold; both boxless agrees) and identical ids."""
    from .boxes import iou

    by_id = {r["id"]: r for r in b}
    both = [(r, by_id[r["id"]]) for r in a if r["id"] in by_id]
    agree = same_ids = 0
    for ra, rb in both:
        ba, bb = ra["boxes_px"], rb["boxes_px"]
        agree += int((not ba and not bb) or (bool(ba) and bool(bb) and iou(ba[0], bb[0]) >= threshold))
        same_ids += int(ra["token_ids"] == rb["token_ids"])
    n = len(both)
    return {"samples": n, "top_box_agreement": agree / n if n else 0.0,
            "identical_token_ids": same_ids / n if n else 0.0,
            "top_box_agree_count": agree, "identical_token_ids_count": same_ids}
