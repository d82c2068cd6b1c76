"""`kosmos2-eval`: run the paper's grounding benchmarks on any backend, precision and decoding.

Exit codes (as kosmos2-ground): 0 done, 2 bad arguments or unusable annotations (missing file,
wrong format, no samples), 3 model cannot be loaded, 1 the run cannot go on (e.g. --out holds
another configuration's predictions). Records that cannot be used and missing images are
counted as skipped in metrics.json, never fatal.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..cli import (
    EXIT_MODEL,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
    ModelLoadError,
    _fail,
    _Parser,
    _quiet_libraries,
    add_ngram_argument,
    load_pipeline,
)
from ..core.defaults import ARTIFACTS_DIR, default_model

PROG = "kosmos2-eval"


def _parser() -> _Parser:
    from ..core.backends.registry import CHOICES
    from ..core.model.decoding import DecodingMode
    from ..core.serving.config import DECODING, PRECISION_CHOICES

    p = _Parser(prog=PROG, description="Kosmos-2 grounding benchmarks: RefCOCO/RefCOCO+/RefCOCOg (accuracy at "
                                       "IoU 0.5) and Flickr30k Entities (Recall@1/5/10); questions about a region "
                                       "(ViP-Bench with boxes, --questions).")
    p.add_argument("--annotations",
                   help="MDETR-style JSON (finetune_refcoco_val.json, final_flickr_separateGT_test.json, ...) or a "
                        "Flickr30k Entities folder (Sentences/, Annotations/, val.txt, test.txt)")
    p.add_argument("--questions",
                   help="instead of --annotations: questions about a region, ViP-Bench's vip-bench-meta-data.json "
                        "(boxes from source_image/*.json) or a JSON list of {id, image, bbox, question, answer}; "
                        "writes answers.jsonl, vipbench_results.json (the evaluator's input) and yes/no metrics")
    p.add_argument("--images", required=True,
                   help="image folder (COCO train2014/, Flickr30k images, ViP-Bench's source_image/)")
    p.add_argument("--split", default="", help="split name (default: from the file name; Flickr folder: test)")
    p.add_argument("--name", default="", help="dataset name (default: the file's dataset_name or its file name)")
    p.add_argument("--out", required=True, help="folder for predictions.jsonl, metrics.json, summary.md, pictures")
    p.add_argument("--model", default=default_model())
    p.add_argument("--backend", default="torch", choices=CHOICES,
                   help="torch (default: the reference), or the backend to check against the paper's figures")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES)
    p.add_argument("--decoding", default=DecodingMode.CONSTRAINED.value, choices=DECODING)
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_ngram_argument(p)
    p.add_argument("--artifacts-dir", default=ARTIFACTS_DIR, help="ONNX graphs and TensorRT engines")
    p.add_argument("--no-download", action="store_true", help="never fetch the model from the hub")
    p.add_argument("--limit", type=int, default=0, help="only the first N samples of the split (0 = all)")
    p.add_argument("--batch", type=int, default=8, help="samples of one image decoded together")
    p.add_argument("--no-negatives", dest="negatives", action="store_false",
                   help="referring expressions: skip running each expression on another image (presence ROC)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help='two configurations, each "key=value,key=value" over the flags above '
                        '(e.g. "backend=torch" "backend=tensorrt,precision=fp16"); runs both on the same samples')
    return p


def parse_spec(spec: str) -> Dict[str, str]:
    """'backend=onnxruntime, precision=fp32' -> {'backend': 'onnxruntime', 'precision': 'fp32'}."""
    out: Dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"configuration {spec!r}: {part!r} is not key=value")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _base_config(args: argparse.Namespace) -> Dict[str, Any]:
    return dict(model=args.model, backend=args.backend, device=args.device, precision=args.precision,
                decoding=args.decoding, max_new_tokens=args.max_new_tokens,
                max_new_tokens_limit=max(512, args.max_new_tokens), no_repeat_ngram_size=args.no_repeat_ngram_size,
                artifacts_dir=args.artifacts_dir, allow_download=not args.no_download, enable_3d=False)


def _label(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", spec)[:60] or "default"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from ..core.serving.config import ConfigError, Kosmos2Config
    from .datasets import DatasetError, load_dataset
    from .runner import RunError

    if args.limit < 0 or args.batch < 1:
        return _fail(PROG, EXIT_USAGE, "--limit must be >= 0 and --batch >= 1")
    if bool(args.annotations) == bool(args.questions):
        return _fail(PROG, EXIT_USAGE, "give --annotations (grounding benchmarks) or --questions (questions about a "
                                       "region), one of them")
    try:
        base = Kosmos2Config.from_dict(_base_config(args))
        specs = [parse_spec(s) for s in args.compare] if args.compare else [{}]
        configs = [base.with_changes(spec) for spec in specs]
    except (ConfigError, ValueError) as exc:
        return _fail(PROG, EXIT_USAGE, str(exc))
    if args.questions:
        return _questions(configs[0], args)
    try:
        dataset = load_dataset(args.annotations, args.images, split=args.split, name=args.name)
    except DatasetError as exc:
        return _fail(PROG, EXIT_USAGE, str(exc))
    if not dataset.samples:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(dataset.skipped.items())) or "none"
        return _fail(PROG, EXIT_USAGE, f"{args.annotations} gives no samples to evaluate"
                                       f"{' in split ' + repr(dataset.split) if dataset.split else ''} "
                                       f"(records skipped: {skipped})")
    out = Path(args.out)
    try:
        if not args.compare:
            _evaluate(configs[0], dataset, out, args)
        else:
            runs = [_evaluate(cfg, dataset, out / name, args, label=f"{name}: {spec}")
                    for cfg, name, spec in zip(configs, ("a", "b"), args.compare)]
            _write_compare(out, tuple(args.compare), runs)   # type: ignore[arg-type]
    except ModelLoadError as exc:
        return _fail(PROG, EXIT_MODEL, str(exc))
    except (RunError, OSError) as exc:
        return _fail(PROG, EXIT_RUNTIME, str(exc))
    return EXIT_OK


def _questions(config: Any, args: argparse.Namespace) -> int:
    """--questions: every question answered about its box; the evaluator's file and the yes/no metrics."""
    from .datasets import DatasetError
    from .metrics import yes_no
    from .questions import RESULTS, answer_questions, read_questions

    try:
        questions, skipped = read_questions(args.questions, args.images)
    except DatasetError as exc:
        return _fail(PROG, EXIT_USAGE, str(exc))
    questions = questions[:args.limit] if args.limit else questions
    if not questions:
        return _fail(PROG, EXIT_USAGE, f"{args.questions} gives no questions "
                                       f"(skipped: {dict(skipped) or 'none'})")
    out = Path(args.out)
    try:
        pipeline = load_pipeline(config)
        try:
            records, not_run = answer_questions(pipeline, questions, out, args.max_new_tokens, args.batch)
        finally:
            pipeline.close()
    except ModelLoadError as exc:
        return _fail(PROG, EXIT_MODEL, str(exc))
    except OSError as exc:
        return _fail(PROG, EXIT_RUNTIME, str(exc))
    skipped.update(not_run)
    metrics = {"questions": len(questions), "answered": len(records), "skipped": dict(sorted(skipped.items())),
               "yes_no": yes_no(records), "model": config.model, "backend": config.backend}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    yn = metrics["yes_no"]
    auc = f", answer_probability AUC {yn['auc']:.3f}" if "auc" in yn else ""
    print(f"{len(records)} of {len(questions)} questions answered -> {out / RESULTS} (score it with ViP-Bench's "
          f"evaluator); yes/no: {yn['questions']} questions, accuracy {100 * yn['accuracy']:.1f} %{auc}")
    return EXIT_OK


def _evaluate(config: Any, dataset: Any, out: Path, args: argparse.Namespace,
              label: str = "") -> Tuple[Dict[str, Any], List[dict]]:
    from . import report, runner

    pipeline = load_pipeline(config)
    try:
        outcome = runner.run(pipeline, dataset, out, limit=args.limit, batch=args.batch,
                             label=f"{PROG} {label or dataset.label}", negatives=args.negatives)
        settings = runner.run_settings(pipeline, dataset)
        settings.update(device=config.device, batch=args.batch, limit=args.limit)
    finally:
        pipeline.close()
    total = min(len(dataset.samples), args.limit) if args.limit else len(dataset.samples)
    skipped = dict(dataset.skipped)
    for reason, n in outcome.skipped.items():
        skipped[reason] = skipped.get(reason, 0) + n
    metrics = report.build_metrics(dataset, outcome.records, skipped, total, settings, outcome.seconds,
                                   outcome.negatives, config.presence_threshold, config.ambiguity_ratio)
    report.write_run_report(out, metrics, outcome.records)
    key, value = report.headline(metrics)
    paper = metrics["paper"]
    print(f"{dataset.label}: {key} {100 * value:.2f} %" + (f" (paper {paper['percent']:.2f} %)" if paper else "")
          + f"; {metrics['counts']['evaluated']} evaluated, {metrics['counts']['skipped_total']} skipped -> {out}")
    return metrics, outcome.records


def _write_compare(out: Path, specs: Tuple[str, str], runs: List[Tuple[Dict[str, Any], List[dict]]]) -> None:
    from . import report, runner

    (ma, ra), (mb, rb) = runs
    agreement = runner.compare_records(ra, rb)
    result = {"a": {"spec": specs[0], "settings": ma["settings"], report.headline(ma)[0]: report.headline(ma)[1]},
              "b": {"spec": specs[1], "settings": mb["settings"], report.headline(mb)[0]: report.headline(mb)[1]},
              **agreement}
    (out / "compare.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    (out / "compare.md").write_text(report.compare_markdown(specs, (ma, mb), agreement))
    report.plot_curves(out / "accuracy_vs_iou.png", [(f"A {_label(specs[0])}", ma["accuracy_vs_iou"]),
                                                     (f"B {_label(specs[1])}", mb["accuracy_vs_iou"])],
                       title=f"{ma['dataset']} {ma['split']}: A vs B", paper=ma.get("paper"))
    print(f"compare: top boxes agree {100 * agreement['top_box_agreement']:.2f} %, identical token ids "
          f"{100 * agreement['identical_token_ids']:.2f} % over {agreement['samples']} samples -> {out}")


if __name__ == "__main__":
    sys.exit(main())
