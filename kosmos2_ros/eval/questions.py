"""Questions about a region (ViP-Bench with bounding boxes, the paper's one benchmark row): read, answer, write.

Two inputs:
- a plain question file (JSON list or JSON lines), each item `{"id", "image", "question", "answer",
  "bbox": [x0, y0, x1, y1] in pixels or null}`: the question's [bracketed] phrase (or its first
  "this"/"that"/"it") is linked to the box, as the node's `vqa` does;
- ViP-Bench's own `vip-bench-meta-data.json` (`{"v1_N": {"image", "image_source", "question",
  "answer", "capability"}}`), with each source image's box from `source_image/<name>.json` (LabelMe:
  `shapes` of `shape_type` rectangle, `points` two corners) and the question's `<obj>` becoming
  `[this]`. Items with more than one `<obj…>`, or no rectangle, are skipped with the reason.

Written: `answers.jsonl` (every answer, with its yes/no probability where the expected answer is yes
or no) and `vipbench_results.json`, `{"v1_N": answer}`: the file ViP-Bench's evaluator
(`scripts/eval/vip-bench_evaluator.py`, an external GPT-4 judge this package does not call) reads.
Yes/no items also get a `check` (the same question answered yes or no with p(yes)); `metrics.yes_no`
reports their accuracy and the ROC of that probability.
"""
from __future__ import annotations

import json
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .boxes import Box
from .datasets import DatasetError

OBJ = re.compile(r"<obj\d*>")
RESULTS = "vipbench_results.json"
ANSWERS = "answers.jsonl"


@dataclass
class Question:
    id: str
    image: str                               # image file path
    question: str                            # with the region's phrase [bracketed] when `bbox` is set
    bbox: Optional[Box] = None               # pixels, corners
    answer: str = ""                         # expected ("" = unknown); ViP-Bench's may hold <OR>/<AND>
    capability: List[str] = field(default_factory=list)

    @property
    def expected_yes_no(self) -> str:
        """"yes" or "no" when the expected answer is one of them, else ""."""
        first = re.split(r"<OR>|<AND>", self.answer)[0].strip().strip(".!").lower()
        return first if first in ("yes", "no") else ""


def read_questions(path: str, images: str) -> Tuple[List[Question], Counter]:
    """Questions from a plain question file or ViP-Bench's meta-data file; (questions, skipped by reason)."""
    file, folder = Path(path), Path(images)
    if not file.is_file():
        raise DatasetError(f"question file {path} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        data: Any = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise DatasetError(f"{path} is neither JSON nor JSON lines") from None
    if isinstance(data, dict):
        return _vip_bench(data, file, folder)
    if isinstance(data, list):
        return _plain(data, folder)
    raise DatasetError(f"{path}: expected a list of questions or ViP-Bench's meta-data mapping")


def _plain(items: List[Any], images: Path) -> Tuple[List[Question], Counter]:
    out, skipped = [], Counter()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not item.get("image"):
            skipped["no question or image"] += 1
            continue
        bbox = item.get("bbox")
        box = _box(bbox) if bbox is not None else None
        if bbox is not None and box is None:
            skipped["bad bbox"] += 1
            continue
        out.append(Question(id=str(item.get("id", i)), image=str(images / item["image"]), question=item["question"],
                            bbox=box, answer=str(item.get("answer", "")), capability=list(item.get("capability", []))))
    return out, skipped


def _vip_bench(meta: Dict[str, Any], file: Path, images: Path) -> Tuple[List[Question], Counter]:
    """ViP-Bench's meta-data: the box of each item from its source image's LabelMe annotation."""
    root = file.parent
    out, skipped = [], Counter()
    for qid, item in meta.items():
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            skipped["no question"] += 1
            continue
        question = item["question"]
        tags = OBJ.findall(question)
        if len(tags) != 1:
            skipped["not one <obj> (a box per question)"] += 1
            continue
        source = str(item.get("image_source") or item.get("image") or "")
        box = _labelme_box(root / "source_image" / (Path(source).stem + ".json"), tags[0].strip("<>"))
        if box is None:
            skipped["no rectangle for its <obj>"] += 1
            continue
        image = images / source
        out.append(Question(id=str(qid), image=str(image), question=OBJ.sub("[this]", question, count=1), bbox=box,
                            answer=str(item.get("answer", "")), capability=list(item.get("capability", []))))
    return out, skipped


def _labelme_box(path: Path, label: str) -> Optional[Box]:
    try:
        shapes = json.loads(path.read_text(encoding="utf-8")).get("shapes", [])
    except (OSError, ValueError, AttributeError):
        return None
    for shape in shapes:
        if shape.get("shape_type") == "rectangle" and shape.get("label", label) == label:
            points = shape.get("points") or []
            if len(points) == 2:
                (xa, ya), (xb, yb) = points
                return _box([min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)])
    return None


def _box(value: Any) -> Optional[Box]:
    try:
        x0, y0, x1, y1 = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def answer_text(text: str) -> str:
    """The answer alone: a vqa result's text is the prompt's clean text and the generation ("Question: ...
    Answer: a red mug."); the evaluator's judge must read only what follows the prompt's "Answer:"."""
    return text.split("Answer:", 1)[-1].strip()


def answer_questions(pipeline: Any, questions: Sequence[Question], out: Path, max_new_tokens: int = 32,
                     batch: int = 8) -> Tuple[List[dict], Counter]:
    """Every question through the pipeline (vqa about its box; yes/no items also as a check), grouped by
    image; records written to answers.jsonl and the evaluator's file. Returns (records, skipped)."""
    from ..cli import load_rgb
    from ..core.serving.frames import Frame
    from ..core.serving.pipeline import Command, Status

    out.mkdir(parents=True, exist_ok=True)
    by_image: OrderedDict[str, List[Question]] = OrderedDict()
    for q in questions:
        by_image.setdefault(q.image, []).append(q)
    records: List[dict] = []
    skipped: Counter = Counter()
    with (out / ANSWERS).open("w", encoding="utf-8") as sink:     # each record as it is made: a crash keeps them
        for image, group in by_image.items():
            try:
                frame = Frame(rgb=load_rgb(image), frame_id=Path(image).name)
            except (OSError, ValueError):
                skipped["missing or unreadable image"] += len(group)
                continue
            for start in range(0, len(group), max(1, batch)):
                chunk = group[start:start + max(1, batch)]
                commands = []
                for q in chunk:
                    commands.append(Command(id=q.id, task="vqa", text=q.question, region_px=q.bbox,
                                            max_new_tokens=max_new_tokens))
                    if q.expected_yes_no:
                        commands.append(Command(id=f"{q.id}?", task="check", text=q.question, region_px=q.bbox,
                                                max_new_tokens=1))
                answered = pipeline.run_batch(commands, frame)
                if len(answered) != len(commands):
                    raise RuntimeError(f"{len(commands)} commands gave {len(answered)} results")
                results = iter(answered)
                for q in chunk:
                    res = next(results)
                    check = next(results) if q.expected_yes_no else None
                    if res.status is not Status.OK:
                        skipped[f"{res.status.name.lower()}: {res.error.split(':')[0]}"] += 1
                        continue
                    rec = {"id": q.id, "image": q.image, "question": q.question, "bbox": list(q.bbox) if q.bbox else None,
                           "text": answer_text(res.text), "expected": q.expected_yes_no or q.answer,
                           "capability": q.capability, "token_ids": list(res.token_ids)}
                    if check is not None and check.status is Status.OK:
                        rec.update(answer=check.answer, answer_probability=round(float(check.answer_probability), 6))
                    records.append(rec)
                    sink.write(json.dumps(rec, allow_nan=False) + "\n")
                    sink.flush()
    (out / RESULTS).write_text(json.dumps({r["id"]: r["text"] for r in records}, indent=1, ensure_ascii=False))
    return records, skipped
