"""The paper's counting rules, computed from prediction records alone (so any run can be rescored).

- A sample's candidate boxes are the boxes of the generated entities whose phrase equals the
  expression or phrase asked about (whitespace-normalised), in generation order. No such box
  counts as the paper's zero-area box: IoU 0, a miss (the sample stays in the denominator).
- Each candidate's IoU is taken with its best-matching ground-truth box.
- Referring expressions: accuracy at IoU t = the share of samples whose first candidate has
  IoU >= t (the paper's top-1; `any box` = any candidate, the paper's "upper bound").
- Phrase grounding: Recall@k = the share of phrases where one of the first k candidates has
  IoU >= 0.5 with one of the phrase's ground-truth boxes.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

from .boxes import best_iou

THRESHOLD = 0.5
RECALL_KS = (1, 5, 10)
CURVE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))   # 0.05 .. 0.95


def candidate_ious(boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]]) -> List[float]:
    """IoU of each candidate box with its best ground-truth box, in candidate order."""
    return [best_iou(b, gt_boxes) for b in boxes]


def hit_at(ious: Sequence[float], k: int = 1, threshold: float = THRESHOLD) -> bool:
    """One of the first k candidates reaches the threshold (k <= 0: any candidate)."""
    head = ious if k <= 0 else ious[:k]
    return max(head, default=0.0) >= threshold


def top_iou(record: dict) -> float:
    return float(record["iou"][0]) if record.get("iou") else 0.0


def summarize(records: Iterable[dict], kind: str) -> Dict[str, float]:
    """metrics.json's scores for one split: rec -> acc@0.5 (+ any box); phrase -> recall@1/5/10."""
    records = list(records)
    n = len(records)

    def share(pred) -> float:
        return sum(1 for r in records if pred(r)) / n if n else 0.0

    if kind == "rec":
        return {"acc@0.5": share(lambda r: hit_at(r["iou"], 1)),
                "acc@0.5_any_box": share(lambda r: hit_at(r["iou"], 0)),
                "evaluated": n}
    out: Dict[str, float] = {f"recall@{k}": share(lambda r, k=k: hit_at(r["iou"], k)) for k in RECALL_KS}
    out["recall@any"] = share(lambda r: hit_at(r["iou"], 0))
    out["evaluated"] = n
    return out


def per_category_recall(records: Iterable[dict]) -> Dict[str, float]:
    """Flickr30k Entities' phrase types: Recall@1 per type (a phrase counts for each of its types)."""
    totals: Dict[str, List[int]] = {}
    for r in records:
        for cat in r.get("categories") or []:
            t = totals.setdefault(cat, [0, 0])
            t[0] += 1
            t[1] += int(hit_at(r["iou"], 1))
    return {cat: hits / count for cat, (count, hits) in sorted(totals.items())}


def accuracy_curve(records: Iterable[dict], thresholds: Sequence[float] = CURVE_THRESHOLDS) -> List[List[float]]:
    """[[threshold, share of samples whose first candidate reaches it], ...] (top-1 at each IoU)."""
    ious = [top_iou(r) for r in records]
    n = len(ious)
    return [[t, (sum(1 for v in ious if v >= t) / n) if n else 0.0] for t in thresholds]
