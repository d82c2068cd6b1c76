"""The paper's counting rules, computed from prediction records alone (so any run can be rescored).

- A sample's candidate boxes are the boxes of the generated entities whose phrase equals the
  expression or phrase asked about (whitespace-normalised), in generation order. No such box
  counts as the paper's zero-area box: IoU 0, a miss (the sample stays in the denominator).
- Each candidate's IoU is taken with its best-matching ground-truth box.
- Referring expressions: accuracy at IoU t = the share of samples whose first candidate has
  IoU >= t (the paper's top-1; `any box` = any candidate, the paper's "upper bound").
- Phrase grounding: Recall@k = the share of phrases where one of the first k candidates has
  IoU >= 0.5 with one of the phrase's ground-truth boxes.
- "Which one" (referring expressions, `presence_and_candidates`): `acc@0.5_candidates` = the share
  whose chosen box or one of the model's other candidate boxes (the result's `candidates`) reaches
  IoU 0.5; accuracy split by the `ambiguous` flag and against `ambiguity`; and how well `presence`
  tells an expression about its own image from the same expression about another image of the set
  (negatives): the ROC curve, its AUC, and the false-positive and miss rates at a threshold.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

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


#: presence thresholds at which false-positive and miss rates are reported (to pick presence_threshold from).
PRESENCE_THRESHOLDS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
#: Edges of the ambiguity bins for accuracy against ambiguity (the last bin holds everything above).
AMBIGUITY_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def roc(positives: Sequence[float], negatives: Sequence[float]) -> List[List[float]]:
    """[[false-positive rate, true-positive rate], ...] as the threshold falls through every score."""
    if not positives or not negatives:
        return []
    points = [[0.0, 0.0]]
    for t in sorted(set(positives) | set(negatives), reverse=True):
        points.append([sum(v >= t for v in negatives) / len(negatives), sum(v >= t for v in positives) / len(positives)])
    return points


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive's score > a negative's), ties counting half: the area under the ROC curve."""
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def presence_and_candidates(records: Sequence[dict], negatives: Sequence[dict], threshold: float,
                            ambiguity_ratio: float) -> Dict[str, Any]:
    """metrics.json's "which one" block for a referring-expression split (see the module docstring)."""
    records = [r for r in records if "presence" in r]
    n = len(records)

    def acc(rs: Sequence[dict], key: str = "iou") -> float:
        return sum(1 for r in rs if hit_at(r.get(key) or [], 1)) / len(rs) if rs else 0.0

    with_candidates = [r for r in records if hit_at(r["iou"], 1) or max(r.get("candidate_iou") or [0.0]) >= THRESHOLD]
    ambiguous = [r for r in records if r.get("ambiguous")]
    clear = [r for r in records if not r.get("ambiguous")]
    bins = []
    edges = list(AMBIGUITY_BINS) + [float("inf")]
    for lo, hi in zip(edges, edges[1:]):
        inside = [r for r in records if lo <= float(r.get("ambiguity", 0.0)) < hi]
        if inside:
            bins.append([min(lo + 0.125, 1.0), acc(inside), len(inside)])
    pos = [float(r["presence"]) for r in records if r.get("presence", -1) >= 0]
    neg = [float(r["presence"]) for r in negatives if r.get("presence", -1) >= 0]
    out: Dict[str, Any] = {
        "acc@0.5_candidates": len(with_candidates) / n if n else 0.0,
        "by_ambiguous": {"ambiguous": {"acc@0.5": acc(ambiguous), "samples": len(ambiguous)},
                         "not_ambiguous": {"acc@0.5": acc(clear), "samples": len(clear)},
                         "ambiguity_ratio": ambiguity_ratio},
        "accuracy_vs_ambiguity": bins,
    }
    presence: Dict[str, Optional[Any]] = {"positives": len(pos), "negatives": len(neg), "threshold": threshold}
    if pos and neg:
        def rates(t: float) -> List[float]:
            return [t, sum(v >= t for v in neg) / len(neg), sum(v < t for v in pos) / len(pos)]

        presence.update(auc=auc(pos, neg), roc=roc(pos, neg), false_positive_rate=rates(threshold)[1],
                        miss_rate=rates(threshold)[2], rates_at=[rates(t) for t in PRESENCE_THRESHOLDS])
    out["presence"] = presence
    return out


#: The three signals of "is it there" a referring-expression run records on its own image and on another.
NOT_THERE_SIGNALS = ("presence", "score", "yes_probability")


def not_there(records: Sequence[dict], negatives: Sequence[dict]) -> Dict[str, Any]:
    """Each signal's ROC and AUC, positives the expressions on their own image, negatives on another: which
    one separates "not there" on this checkpoint (docs/which-one.md)."""
    out: Dict[str, Any] = {}
    for key in NOT_THERE_SIGNALS:
        pos = [float(r[key]) for r in records if r.get(key) is not None and r[key] >= 0]
        neg = [float(r[key]) for r in negatives if r.get(key) is not None and r[key] >= 0]
        entry: Dict[str, Any] = {"positives": len(pos), "negatives": len(neg)}
        if pos and neg:
            entry.update(auc=auc(pos, neg), roc=roc(pos, neg))
        out[key] = entry
    return out


def yes_no(records: Sequence[dict]) -> Dict[str, Any]:
    """A yes/no question set: accuracy of `answer` and the ROC of answer_probability (positives: the
    questions whose right answer is yes)."""
    rs = [r for r in records if r.get("expected") in ("yes", "no") and r.get("answer_probability") is not None]
    pos = [float(r["answer_probability"]) for r in rs if r["expected"] == "yes"]
    neg = [float(r["answer_probability"]) for r in rs if r["expected"] == "no"]
    out: Dict[str, Any] = {"questions": len(rs), "yes": len(pos), "no": len(neg),
                           "accuracy": sum(r["answer"] == r["expected"] for r in rs) / len(rs) if rs else 0.0}
    if pos and neg:
        out.update(auc=auc(pos, neg), roc=roc(pos, neg))
    return out
