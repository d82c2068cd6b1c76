"""The "which one" evidence on the toy: presence, candidates and the ambiguity flag per scene kind.

    scripts/ros-env python bench/which_one_toy.py [--seeds 100:116] [--steps 600]

Builds the tiny checkpoint and the toy trained from it (`checkpoints.build_which_one_checkpoint`:
an expression's object is absent, there once, or there twice, by the image's brightness class and
the expression), then
runs refer commands on images it was not trained on and prints, per scene kind, how often the chosen
box is right, how often the other object is among the candidates, and how often the result is
flagged ambiguous; then `kosmos2-eval` on the same scenes as a referring-expression set
(`checkpoints.write_which_one_set`: a two-object scene's truth is one of the two) and its "which
one" numbers. Not a timing benchmark: evidence on a toy whose truth is known (on the real weights
`kosmos2-eval` on RefCOCO measures the same).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="100:116", help="unseen toy images, start:stop")
    ap.add_argument("--steps", type=int, default=600, help="training steps of the toy")
    args = ap.parse_args(argv)
    import json

    from kosmos2_ros.core.serving.config import Kosmos2Config
    from kosmos2_ros.core.serving.pipeline import Pipeline
    from kosmos2_ros.eval.cli import main as kosmos2_eval
    from kosmos2_ros.fixtures import checkpoints

    start, stop = (int(x) for x in args.seeds.split(":"))
    if start < checkpoints.WHICH_ONE_TRAIN_IMAGES:
        ap.error(f"seeds below {checkpoints.WHICH_ONE_TRAIN_IMAGES} are the toy's training images")
    if stop - start < 2 or (stop - start) % 2:
        ap.error("--seeds: an even number of images (the evaluation set's negatives need it)")
    work = Path(tempfile.mkdtemp(prefix="kosmos2_which_one_"))
    tiny = checkpoints.build_tiny_checkpoint(work / "tiny")
    toy = checkpoints.build_which_one_checkpoint(str(tiny), str(work / "toy"), steps=args.steps)
    pipe = Pipeline.load(Kosmos2Config(model=str(toy), backend="torch", device="cpu", allow_download=False,
                                       max_candidates=3, enable_3d=False))
    rates = checkpoints.which_one_rates(pipe, range(start, stop))
    pipe.close()
    print(f"toy {toy}, {args.steps} steps, unseen images {start}..{stop - 1}, "
          f"max_candidates 3, ambiguity_ratio {pipe.config.ambiguity_ratio} (the defaults)")
    print("| scene | refers | presence median | presence >= 0.5 | chosen box right | other object among candidates "
          "| flagged ambiguous | ambiguity median |")
    print("|---|---|---|---|---|---|---|---|")

    def cell(stats, key, fmt="{:.0%}"):
        return fmt.format(stats[key]) if key in stats else "-"

    for kind, label in (("absent", "absent"), ("one", "one object"), ("two", "two objects")):
        s = rates[kind]
        print(f"| {label} | {int(s['n'])} | {s['presence_median']:.3f} | {cell(s, 'found')} | {cell(s, 'chosen_right')} "
              f"| {cell(s, 'second_found')} | {cell(s, 'ambiguous')} | {cell(s, 'ambiguity_median', '{:.2f}')} |")

    ann = checkpoints.write_which_one_set(work / "set", range(start, stop))
    code = kosmos2_eval(["--annotations", str(ann), "--images", str(work / "set"), "--out", str(work / "eval"),
                         "--model", str(toy), "--device", "cpu", "--no-download"])
    if code:
        return code
    m = json.loads((work / "eval" / "metrics.json").read_text())
    which, pres = m["which_one"], m["which_one"]["presence"]
    split = which["by_ambiguous"]
    print(f"\nkosmos2-eval on the same scenes ({work / 'eval'}):")
    print("| acc@0.5 | acc@0.5_candidates | acc@0.5 ambiguous (n) | acc@0.5 not ambiguous (n) | presence AUC "
          "| false positives / misses at presence_threshold " + ", ".join(f"{t:g}" for t, _, _ in pres["rates_at"]) + " |")
    print("|---|---|---|---|---|---|")
    print(f"| {m['acc@0.5']:.0%} | {m['acc@0.5_candidates']:.0%} "
          f"| {split['ambiguous']['acc@0.5']:.0%} ({split['ambiguous']['samples']}) "
          f"| {split['not_ambiguous']['acc@0.5']:.0%} ({split['not_ambiguous']['samples']}) "
          f"| {pres['auc']:.3f} | " + ", ".join(f"{fp:.0%} / {miss:.0%}" for _, fp, miss in pres["rates_at"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
