"""What a run leaves in --out: metrics.json, summary.md, accuracy_vs_iou.png, worst_misses.png.

Pictures are drawn with PIL (no plotting library needed).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .datasets import REC, Dataset
from .metrics import accuracy_curve, not_there, per_category_recall, presence_and_candidates, summarize, top_iou

# The paper's zero-shot figures (Kosmos-2, arXiv 2306.14824, Tables 2 and 3; the unilm
# kosmos-2/evaluation READMEs): what the real weights should reproduce.
PAPER: Dict[Tuple[str, str], Tuple[str, float]] = {
    ("refcoco", "val"): ("acc@0.5", 52.32), ("refcoco", "testA"): ("acc@0.5", 57.42),
    ("refcoco", "testB"): ("acc@0.5", 47.26),
    ("refcoco+", "val"): ("acc@0.5", 45.48), ("refcoco+", "testA"): ("acc@0.5", 50.73),
    ("refcoco+", "testB"): ("acc@0.5", 42.24),
    ("refcocog", "val"): ("acc@0.5", 60.57), ("refcocog", "test"): ("acc@0.5", 61.65),
    ("flickr30k_entities", "val"): ("recall@1", 77.8), ("flickr30k_entities", "test"): ("recall@1", 78.7),
}

GREEN, RED, ORANGE = (40, 200, 60), (230, 30, 40), (250, 160, 40)


def dataset_kind(dataset: Dataset, records: Sequence[dict]) -> str:
    kinds = {s.kind for s in dataset.samples} | {r.get("kind") for r in records}
    return REC if kinds <= {REC} else "phrase"


def build_metrics(dataset: Dataset, records: List[dict], skipped: Dict[str, int], total: int,
                  settings: Dict[str, Any], seconds: float = 0.0, negatives: Sequence[dict] = (),
                  presence_threshold: float = 0.0, ambiguity_ratio: float = 0.5) -> Dict[str, Any]:
    kind = dataset_kind(dataset, records)
    scores = summarize(records, kind)
    paper = PAPER.get((dataset.name, dataset.split))
    out: Dict[str, Any] = {
        "dataset": dataset.name, "split": dataset.split, "task": "referring expressions" if kind == REC
        else "phrase grounding", **{k: v for k, v in scores.items() if k != "evaluated"},
        "counts": {"samples": total, "evaluated": int(scores["evaluated"]),
                   "without_box": sum(1 for r in records if not r.get("boxes_px")),
                   "skipped": dict(sorted(skipped.items())), "skipped_total": int(sum(skipped.values()))},
        "settings": settings,
        "paper": {"metric": paper[0], "percent": paper[1]} if paper else None,
        "accuracy_vs_iou": accuracy_curve(records),
        "seconds_this_run": round(seconds, 2),
    }
    if kind != REC:
        out["recall@1_by_category"] = per_category_recall(records)
    elif any("presence" in r for r in records):
        which = presence_and_candidates(records, negatives, presence_threshold, ambiguity_ratio)
        out["acc@0.5_candidates"] = which.pop("acc@0.5_candidates")
        out["which_one"] = which
        out["not_there"] = not_there(records, negatives)
    return out


def headline(metrics: Dict[str, Any]) -> Tuple[str, float]:
    key = "acc@0.5" if "acc@0.5" in metrics else "recall@1"
    return key, float(metrics[key])


def summary_markdown(metrics: Dict[str, Any], title: str = "kosmos2-eval") -> str:
    key, ours = headline(metrics)
    paper = metrics.get("paper")
    counts = metrics["counts"]
    s = metrics["settings"]
    lines = [f"# {title}: {metrics['dataset']} {metrics['split']}", "",
             f"{metrics['task']}; model `{s.get('model')}`, backend {s.get('backend')}, precision "
             f"{s.get('precision')}, decoding {s.get('decoding')}, no_repeat_ngram_size "
             f"{s.get('no_repeat_ngram_size')}, max_new_tokens {s.get('max_new_tokens')}", "",
             "| split | metric | paper (%) | ours (%) | evaluated | skipped |", "|---|---|---|---|---|---|",
             f"| {metrics['dataset']} {metrics['split']} | {key} | {paper['percent']:.2f} | " if paper else
             f"| {metrics['dataset']} {metrics['split']} | {key} | - | "]
    lines[-1] += f"{100 * ours:.2f} | {counts['evaluated']} | {counts['skipped_total']} |"
    extra = [k for k in ("acc@0.5_any_box", "recall@5", "recall@10", "recall@any") if k in metrics]
    if extra:
        lines += ["", "Also: " + ", ".join(f"{k} {100 * metrics[k]:.2f} %" for k in extra)]
    if counts.get("without_box"):
        lines += ["", f"{counts['without_box']} evaluated samples got no box for their phrase: misses, as the paper's "
                  "zero-area box."]
    if counts["skipped"]:
        lines += ["", "Skipped: " + ", ".join(f"{reason}: {n}" for reason, n in counts["skipped"].items())]
    if metrics.get("recall@1_by_category"):
        lines += ["", "| phrase type | recall@1 (%) |", "|---|---|"]
        lines += [f"| {c} | {100 * v:.2f} |" for c, v in metrics["recall@1_by_category"].items()]
    which = metrics.get("which_one")
    if which:
        amb, clear, pres = which["by_ambiguous"]["ambiguous"], which["by_ambiguous"]["not_ambiguous"], which["presence"]
        lines += ["", f"Which one: acc@0.5 with the candidates {100 * metrics['acc@0.5_candidates']:.2f} %; "
                  f"ambiguous (ambiguity >= {which['by_ambiguous']['ambiguity_ratio']:g}) {100 * amb['acc@0.5']:.2f} % "
                  f"of {amb['samples']}, not ambiguous {100 * clear['acc@0.5']:.2f} % of {clear['samples']} "
                  "(`accuracy_vs_ambiguity.png`)."]
        if "auc" in pres:
            lines += ["", f"Presence (each expression on its image vs on another image of the set): AUC {pres['auc']:.3f}; "
                      f"at presence_threshold {pres['threshold']:g}: false positives {100 * pres['false_positive_rate']:.1f} %, "
                      f"misses {100 * pres['miss_rate']:.1f} % ({pres['positives']} / {pres['negatives']}; "
                      "`presence_roc.png`)."]
            lines += ["", "| presence_threshold | false positives (%) | misses (%) |", "|---|---|---|"]
            lines += [f"| {t:g} | {100 * fp:.1f} | {100 * miss:.1f} |" for t, fp, miss in pres["rates_at"]]
    signals = metrics.get("not_there") or {}
    if any("auc" in v for v in signals.values()):
        lines += ["", "Which signal says \"not there\" (each expression on its own image vs on another image; "
                  "`not_there_roc.png`; docs/which-one.md):", "",
                  "| signal | AUC | positives | negatives |", "|---|---|---|---|"]
        lines += [f"| {name} | {v['auc']:.3f} | {v['positives']} | {v['negatives']} |"
                  for name, v in signals.items() if "auc" in v]
    if not paper:
        lines += ["", "(No paper figure for this dataset/split: the paper reports RefCOCO/+ val, testA, testB; "
                  "RefCOCOg val, test; Flickr30k Entities val, test.)"]
    lines += ["", "Pictures: `accuracy_vs_iou.png` (top-1 accuracy against the IoU threshold), "
              "`worst_misses.png` (misses with the lowest IoU: true boxes green, predicted red)."]
    return "\n".join(lines) + "\n"


def write_run_report(out: Path, metrics: Dict[str, Any], records: List[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    (out / "summary.md").write_text(summary_markdown(metrics))
    plot_curves(out / "accuracy_vs_iou.png", [(f"{metrics['dataset']} {metrics['split']}", metrics["accuracy_vs_iou"])],
                title=f"{metrics['dataset']} {metrics['split']}: top-1 accuracy vs IoU threshold",
                paper=metrics.get("paper"))
    contact_sheet(out / "worst_misses.png", records)
    which = metrics.get("which_one")
    if which:
        if which["accuracy_vs_ambiguity"]:
            plot_curves(out / "accuracy_vs_ambiguity.png",
                        [("acc@0.5", [[x, a] for x, a, _ in which["accuracy_vs_ambiguity"]])],
                        title="top-1 accuracy against ambiguity (best candidate / chosen score; last bin >= 1)",
                        x_label="ambiguity")
        if which["presence"].get("roc"):
            plot_curves(out / "presence_roc.png", [(f"AUC {which['presence']['auc']:.3f}", which["presence"]["roc"])],
                        title="presence: own image (true positives) vs another image (false positives)",
                        x_label="false-positive rate")
    signals = [(f"{name} AUC {v['auc']:.3f}", v["roc"]) for name, v in (metrics.get("not_there") or {}).items()
               if v.get("roc")]
    if signals:
        plot_curves(out / "not_there_roc.png", signals, x_label="false-positive rate",
                    title="presence, box score, yes/no check: own image (true positives) vs another image")


# -- pictures ----------------------------------------------------------------------------------------

def _font(size: int = 14):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1
        return ImageFont.load_default()


def plot_curves(path: Path, curves: Sequence[Tuple[str, Sequence[Sequence[float]]]], title: str = "",
                paper: Optional[Dict[str, Any]] = None, size: Tuple[int, int] = (720, 460),
                x_label: str = "IoU threshold") -> None:
    """A rate (0-100 %) against x in [0, 1] (the IoU threshold unless told), one line per curve; the
    paper's figure at 0.5 as a cross."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 64, 20, 40, 56
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    font, small = _font(15), _font(12)

    def xy(t: float, acc: float) -> Tuple[float, float]:
        return (left + t * (w - left - right), top + (1.0 - acc) * (h - top - bottom))

    for i in range(11):
        v = i / 10
        x, _ = xy(v, 0)
        _, y = xy(0, v)
        d.line([x, top, x, h - bottom], fill=(232, 232, 232))
        d.line([left, y, w - right, y], fill=(232, 232, 232))
        d.text((x - 8, h - bottom + 6), f"{v:.1f}", fill=(60, 60, 60), font=small)
        d.text((left - 40, y - 7), f"{100 * v:.0f}%", fill=(60, 60, 60), font=small)
    d.rectangle([left, top, w - right, h - bottom], outline=(80, 80, 80))
    d.line([*xy(0.5, 0), xy(0.5, 1)[0], top], fill=(170, 170, 170), width=1)
    d.text((left, 10), title, fill=(0, 0, 0), font=font)
    d.text((w // 2 - 40, h - 24), x_label, fill=(0, 0, 0), font=small)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for i, (name, points) in enumerate(curves):
        colour = colours[i % len(colours)]
        pts = [xy(min(max(t, 0.0), 1.0), a) for t, a in points]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=3)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        lx, ly = w - right - 250, top + 14 + 18 * i
        d.line([lx, ly, lx + 22, ly], fill=colour, width=3)
        d.text((lx + 28, ly - 7), name, fill=colour, font=small)
    if paper:
        x, y = xy(0.5, paper["percent"] / 100)
        d.line([x - 7, y - 7, x + 7, y + 7], fill=(0, 0, 0), width=2)
        d.line([x - 7, y + 7, x + 7, y - 7], fill=(0, 0, 0), width=2)
        d.text((x + 9, y - 16), f"paper {paper['percent']:.2f}%", fill=(0, 0, 0), font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def worst_misses(records: Sequence[dict], count: int = 12) -> List[dict]:
    """Misses, lowest top-box IoU first; among equals, the most confident first."""
    misses = [r for r in records if not r.get("hit")]

    def confidence(r: dict) -> float:
        s = (r.get("scores") or [None])[0]
        return -1.0 if s is None or (isinstance(s, float) and math.isnan(s)) else float(s)

    return sorted(misses, key=lambda r: (top_iou(r), -confidence(r)))[:count]


def contact_sheet(path: Path, records: Sequence[dict], count: int = 12, tile: int = 240, columns: int = 4) -> None:
    """The worst misses, each image with true boxes (green) and predicted ones (red: top box, orange: others)."""
    from PIL import Image, ImageDraw

    chosen = worst_misses(records, count)
    rows = max(1, math.ceil(len(chosen) / columns))
    band = 46
    sheet = Image.new("RGB", (columns * tile, rows * (tile + band)), (250, 250, 250))
    d = ImageDraw.Draw(sheet)
    font = _font(12)
    if not chosen:
        d.text((10, 10), "no misses", fill=(0, 0, 0), font=font)
    for i, rec in enumerate(chosen):
        ox, oy = (i % columns) * tile, (i // columns) * (tile + band)
        try:
            with Image.open(rec["image"]) as im:
                im = im.convert("RGB")
                scale = min(tile / im.width, tile / im.height)
                thumb = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))))
        except (OSError, ValueError):
            d.text((ox + 6, oy + 6), "image unavailable", fill=(0, 0, 0), font=font)
            continue
        sheet.paste(thumb, (ox, oy))

        for box in rec.get("gt_boxes", []):
            _draw_box(d, box, (ox, oy), scale, GREEN, 3)
        for k, box in enumerate(rec.get("boxes_px", [])):
            _draw_box(d, box, (ox, oy), scale, RED if k == 0 else ORANGE, 2 if k == 0 else 1)
        query = rec.get("expression") or rec.get("phrase") or ""
        d.text((ox + 4, oy + tile + 2), query[:38], fill=(0, 0, 0), font=font)
        d.text((ox + 4, oy + tile + 18), f"IoU {top_iou(rec):.2f}  id {rec['id']}"[:40], fill=(90, 90, 90), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _draw_box(d: Any, box: Sequence[float], origin: Tuple[int, int], scale: float,
              colour: Tuple[int, int, int], width: int) -> None:
    x0, y0, x1, y1 = (origin[k % 2] + v * scale for k, v in enumerate(box))
    d.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=colour, width=width)


def compare_markdown(labels: Tuple[str, str], metrics: Tuple[Dict[str, Any], Dict[str, Any]],
                     agreement: Dict[str, Any]) -> str:
    key, _ = headline(metrics[0])
    lines = [f"# kosmos2-eval --compare: {metrics[0]['dataset']} {metrics[0]['split']}", "",
             f"{agreement['samples']} samples run by both.", "",
             "| | value |", "|---|---|",
             f"| top boxes agree (IoU >= 0.5) | {100 * agreement['top_box_agreement']:.2f} % "
             f"({agreement['top_box_agree_count']}/{agreement['samples']}) |",
             f"| identical token ids | {100 * agreement['identical_token_ids']:.2f} % "
             f"({agreement['identical_token_ids_count']}/{agreement['samples']}) |"]
    for label, m in zip(labels, metrics):
        lines.append(f"| {key} of A/B `{label}` | {100 * headline(m)[1]:.2f} % |")
    return "\n".join(lines) + "\n"
