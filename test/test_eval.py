"""kosmos2-eval on synthetic datasets written in the paper's input formats, with the trained tiny checkpoint.

Scenes come from `core.scenes` with known boxes; the tests recompute every metric themselves
from the predictions and the ground truth they wrote, and check the counting rules on
hand-made cases.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from kosmos2_ros.eval import boxes, datasets, metrics
from kosmos2_ros.eval.cli import main, parse_spec
from kosmos2_ros.fixtures.scenes import draw_scene

N_IMAGES = 3


def xywh(box) -> List[float]:
    x0, y0, x1, y1 = box
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def my_iou(a, b) -> float:
    """Written again here, not imported: the test's own IoU of two corner boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, List[Dict[str, Any]]]:
    """N_IMAGES generated scenes saved as JPEG, with their objects' true boxes."""
    folder = tmp_path_factory.mktemp("eval_images")
    out = []
    for i in range(N_IMAGES):
        rgb, objects = draw_scene(200 + 20 * i, 160, np.random.default_rng(10 + i), count=2)
        name = f"{1000 + i}.jpg"
        Image.fromarray(rgb).save(folder / name, quality=95)
        out.append({"file_name": name, "width": rgb.shape[1], "height": rgb.shape[0], "objects": objects})
    return folder, out


def write_refcoco(path: Path, scenes: List[Dict[str, Any]], gt=None) -> List[Tuple[str, str, Tuple]]:
    """MDETR's finetune_refcoco_*.json: one image entry per expression, one annotation each."""
    images, anns, truth = [], [], []
    for i, scene in enumerate(scenes):
        for j, obj in enumerate(scene["objects"]):
            eid = 100 * i + j
            box = gt[str(eid)] if gt and str(eid) in gt else obj["box"]
            images.append({"id": eid, "file_name": scene["file_name"], "height": scene["height"],
                           "width": scene["width"], "caption": obj["name"], "dataset_name": "refcoco",
                           "tokens_negative": [[0, len(obj["name"])]]})
            anns.append({"id": eid, "image_id": eid, "bbox": xywh(box), "category_id": 1, "area": 1.0, "iscrowd": 0})
            truth.append((str(eid), obj["name"], tuple(float(v) for v in box)))
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "object"}]}))
    return truth


def write_flickr(root: Path, scenes: List[Dict[str, Any]], split: str = "val") -> Dict[str, List[Tuple]]:
    """Flickr30k Entities' own layout: Sentences/<id>.txt, Annotations/<id>.xml, <split>.txt."""
    (root / "Sentences").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    truth: Dict[str, List[Tuple]] = {}
    ids = []
    for scene in scenes:
        image_id = Path(scene["file_name"]).stem
        ids.append(image_id)
        a, b = scene["objects"][:2]
        (root / "Sentences" / f"{image_id}.txt").write_text(
            f"[/EN#1/other {a['name']}] next to [/EN#2/other/clothing {b['name']}] on [/EN#3/scene a table] .\n")
        objects = "".join(
            f"<object><name>{pid}</name><bndbox><xmin>{o['box'][0]}</xmin><ymin>{o['box'][1]}</ymin>"
            f"<xmax>{o['box'][2]}</xmax><ymax>{o['box'][3]}</ymax></bndbox></object>"
            for pid, o in (("1", a), ("2", b)))
        objects += "<object><name>3</name><nobndbox>0</nobndbox><scene>1</scene></object>"
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{scene['width']}</width>"
            f"<height>{scene['height']}</height><depth>3</depth></size>{objects}</annotation>")
        truth[f"{image_id}_0_0"] = [tuple(float(v) for v in a["box"])]
        truth[f"{image_id}_0_1"] = [tuple(float(v) for v in b["box"])]
    (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return truth


def run_eval(capsys, *args: str) -> Tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_predictions(out: Path) -> List[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def common(model_dir: Path, images: Path) -> List[str]:
    return ["--model", str(model_dir), "--images", str(images), "--device", "cpu", "--no-download"]


# -- hand-made cases: boxes, IoU, counting ----------------------------------------------------------

def test_box_conversions() -> None:
    assert boxes.xywh_to_corners([10, 20, 30, 40]) == (10.0, 20.0, 40.0, 60.0)
    assert boxes.corners_to_xywh((10, 20, 40, 60)) == (10.0, 20.0, 30.0, 40.0)
    assert boxes.normalized_to_pixels((0.25, 0.5, 0.75, 1.0), 200, 100) == (50.0, 50.0, 150.0, 100.0)
    assert boxes.pixels_to_normalized((50, 50, 150, 100), 200, 100) == (0.25, 0.5, 0.75, 1.0)
    with pytest.raises(ValueError):
        boxes.pixels_to_normalized((0, 0, 1, 1), 0, 10)
    box = (12.5, 3.0, 80.0, 44.0)
    assert boxes.xywh_to_corners(boxes.corners_to_xywh(box)) == box


def test_iou_hand_made_cases() -> None:
    assert boxes.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert boxes.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert boxes.iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0                    # touching edges
    assert boxes.iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)    # inside
    assert boxes.iou((0, 0, 0, 0), (0, 0, 10, 10)) == 0.0                       # the paper's "no box"
    assert boxes.iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0                         # two zero-area boxes: 0, not NaN
    assert boxes.iou((3, 0, 3, 10), (0, 0, 10, 10)) == 0.0                      # zero width
    # Outside the image: not clipped, areas as given.
    assert boxes.iou((-10, -10, 10, 10), (0, 0, 10, 10)) == pytest.approx(100 / 400)
    assert boxes.iou((300, 300, 310, 310), (0, 0, 10, 10)) == 0.0
    assert boxes.iou((0, 0, float("nan"), 1), (0, 0, 1, 1)) == 0.0
    assert boxes.best_iou((0, 0, 10, 10), [(50, 50, 60, 60), (0, 0, 10, 20)]) == pytest.approx(0.5)
    assert boxes.best_iou((0, 0, 10, 10), []) == 0.0


def test_counting_rules_on_hand_made_records() -> None:
    rec = [
        {"iou": [0.7]},                  # hit
        {"iou": [0.2, 0.9]},             # top box misses, second would hit: not a top-1 hit
        {"iou": []},                     # no box for the phrase: the paper's zero box, a miss
        {"iou": [0.5]},                  # exactly 0.5 counts
    ]
    rec_metrics = metrics.summarize(rec, "rec")
    assert rec_metrics["acc@0.5"] == 2 / 4 and rec_metrics["acc@0.5_any_box"] == 3 / 4 and rec_metrics["evaluated"] == 4
    phrases = [{"iou": [0.1, 0.1, 0.1, 0.1, 0.1, 0.6]}, {"iou": [0.1, 0.7]}, {"iou": [0.8]}, {"iou": []}]
    m = metrics.summarize(phrases, "phrase")
    assert (m["recall@1"], m["recall@5"], m["recall@10"]) == (1 / 4, 2 / 4, 3 / 4)
    assert metrics.per_category_recall([{"iou": [0.9], "categories": ["people", "clothing"]},
                                        {"iou": [0.1], "categories": ["people"]}]) == {"clothing": 1.0, "people": 0.5}
    curve = dict((t, a) for t, a in metrics.accuracy_curve(rec, (0.1, 0.5, 0.8)))
    assert curve == {0.1: 3 / 4, 0.5: 2 / 4, 0.8: 0.0}
    assert metrics.summarize([], "rec")["acc@0.5"] == 0.0


def test_readers_on_hand_made_files(tmp_path: Path) -> None:
    caption = "A man in a red hat walks a dog"
    dog = [caption.index("a dog"), len(caption)]
    data = {"images": [{"id": 1, "file_name": "x.jpg", "caption": caption, "width": 100, "height": 80,
                        "tokens_positive_eval": [[[0, 5]], [[9, 18]], [[40, 45]], [dog]]},
                       {"id": 2, "file_name": "y.jpg"}],          # no caption: malformed
            "annotations": [{"image_id": 1, "bbox": [1, 2, 3, 4], "tokens_positive": [[0, 5]]},
                            {"image_id": 1, "bbox": [10, 10, 5, 5], "tokens_positive": [[11, 18]]},
                            {"image_id": 1, "bbox": [10, 10, "x", 5], "tokens_positive": [dog]},
                            {"image_id": 7, "bbox": [0, 0, 1, 1]}]}   # no such image
    path = tmp_path / "final_flickr_separateGT_val.json"
    path.write_text(json.dumps(data))
    ds = datasets.load_dataset(str(path), str(tmp_path))
    assert (ds.name, ds.split) == ("flickr30k_entities", "val")
    assert [(s.query, s.context, s.gt_boxes) for s in ds.samples] == [
        ("A man", "", [(1.0, 2.0, 4.0, 6.0)]), ("a red hat", "A man in ", [(10.0, 10.0, 15.0, 15.0)])]
    assert ds.skipped == {"annotation without an image entry": 1, "phrase span outside its caption": 1,
                          "annotation with a malformed bbox": 1, "phrase without a box": 1,
                          "malformed image entry": 1}
    text, phrases = datasets.parse_sentence("[/EN#7/people/other A tall man] walks [/EN#8/animals a  dog] .")
    assert text == "A tall man walks a dog ."
    assert phrases == [(0, "A tall man", "7", ["people", "other"]), (4, "a dog", "8", ["animals"])]


# -- end to end with the tiny checkpoint ----------------------------------------------------------

def test_refcoco_metrics_equal_an_independent_computation(tiny_model_dir: Path, scenes, tmp_path: Path,
                                                          capsys) -> None:
    images, scene_list = scenes
    ann = tmp_path / "finetune_refcoco_val.json"
    truth = write_refcoco(ann, scene_list)
    out = tmp_path / "run"
    code, stdout, stderr = run_eval(capsys, "--annotations", str(ann), "--out", str(out),
                                    *common(tiny_model_dir, images))
    assert code == 0, stderr
    assert "samples/s" in stderr and "ETA" in stderr
    preds = read_predictions(out)
    m = json.loads((out / "metrics.json").read_text())
    assert [p["id"] for p in preds] == [t[0] for t in truth]
    hits = 0
    for pred, (_, expression, box) in zip(preds, truth):
        assert pred["expression"] == expression and pred["gt_boxes"] == [list(box)]
        assert len(pred["scores"]) == len(pred["boxes_px"]) >= 1     # constrained decoding: always a box
        top = my_iou(pred["boxes_px"][0], box)
        assert pred["iou"][0] == pytest.approx(top, abs=1e-5)
        assert pred["hit"] == (top >= 0.5)
        hits += top >= 0.5
    assert m["acc@0.5"] == pytest.approx(hits / len(truth))
    assert (m["dataset"], m["split"], m["counts"]["evaluated"], m["counts"]["skipped_total"]) == ("refcoco", "val", 6, 0)
    assert m["paper"] == {"metric": "acc@0.5", "percent": 52.32}
    assert m["settings"]["backend"] == "torch" and m["settings"]["no_repeat_ngram_size"] == 0
    summary = (out / "summary.md").read_text()
    assert "| refcoco val | acc@0.5 | 52.32 |" in summary and f"{100 * hits / 6:.2f}" in summary
    for png in ("accuracy_vs_iou.png", "worst_misses.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 200 and im.size[1] > 100

    # Ground truth moved onto each prediction: every sample hits. Then one box shifted by 60 % of its
    # width (IoU 0.4 / 1.6 = 0.25): exactly one fewer hit.
    on_pred = {p["id"]: tuple(p["boxes_px"][0]) for p in preds}
    exact = tmp_path / "exact" / "finetune_refcoco_val.json"
    exact.parent.mkdir()
    write_refcoco(exact, scene_list, gt=on_pred)
    assert run_eval(capsys, "--annotations", str(exact), "--out", str(tmp_path / "r_exact"),
                    *common(tiny_model_dir, images))[0] == 0
    assert json.loads((tmp_path / "r_exact" / "metrics.json").read_text())["acc@0.5"] == 1.0
    first = truth[0][0]
    x0, y0, x1, y1 = on_pred[first]
    shifted = dict(on_pred, **{first: (x0 + 0.6 * (x1 - x0), y0, x1 + 0.6 * (x1 - x0), y1)})
    moved = tmp_path / "moved" / "finetune_refcoco_val.json"
    moved.parent.mkdir()
    write_refcoco(moved, scene_list, gt=shifted)
    assert run_eval(capsys, "--annotations", str(moved), "--out", str(tmp_path / "r_moved"),
                    *common(tiny_model_dir, images))[0] == 0
    m_moved = json.loads((tmp_path / "r_moved" / "metrics.json").read_text())
    assert m_moved["acc@0.5"] == pytest.approx(5 / 6)
    worst = read_predictions(tmp_path / "r_moved")[0]
    assert worst["id"] == first and worst["iou"][0] == pytest.approx(0.25, abs=1e-3) and not worst["hit"]


def test_runs_resume_and_count_what_they_skip(tiny_model_dir: Path, scenes, tmp_path: Path, capsys) -> None:
    images, scene_list = scenes
    ann = tmp_path / "finetune_refcocog_test.json"
    write_refcoco(ann, scene_list)
    out = tmp_path / "run"
    args = ["--annotations", str(ann), "--out", str(out), *common(tiny_model_dir, images)]
    assert run_eval(capsys, *args, "--limit", "2")[0] == 0
    assert len(read_predictions(out)) == 2
    assert json.loads((out / "metrics.json").read_text())["counts"]["samples"] == 2
    # Stopped mid-write: the torn line is dropped and its sample runs again; the others are kept.
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text(lines[0] + "\n" + lines[1][:25])
    code, stdout, _ = run_eval(capsys, *args)
    assert code == 0
    preds = read_predictions(out)
    assert len(preds) == 6 and len({p["id"] for p in preds}) == 6 and preds[0] == json.loads(lines[0])
    before = (out / "predictions.jsonl").read_text()
    assert run_eval(capsys, *args)[0] == 0 and (out / "predictions.jsonl").read_text() == before   # nothing re-run
    # Other settings into the same --out: refused in one line.
    code, _, err = run_eval(capsys, *args, "--decoding", "free")
    assert code == 1 and err.strip().count("\n") == 0 and "other settings (decoding differ)" in err
    # A missing image is counted, never fatal.
    images2 = tmp_path / "images2"
    shutil.copytree(images, images2)
    (images2 / scene_list[1]["file_name"]).unlink()
    out2 = tmp_path / "run2"
    assert run_eval(capsys, "--annotations", str(ann), "--out", str(out2), *common(tiny_model_dir, images2))[0] == 0
    m = json.loads((out2 / "metrics.json").read_text())
    assert m["counts"]["skipped"] == {"missing image": 2} and m["counts"]["evaluated"] == 4


def test_flickr_entities_recall_equals_an_independent_computation(tiny_model_dir: Path, scenes, tmp_path: Path,
                                                                  capsys) -> None:
    images, scene_list = scenes
    root = tmp_path / "flickr30k_entities"
    truth = write_flickr(root, scene_list, split="val")
    out = tmp_path / "run"
    code, stdout, stderr = run_eval(capsys, "--annotations", str(root), "--split", "val", "--out", str(out),
                                    *common(tiny_model_dir, images))
    assert code == 0, stderr
    preds = read_predictions(out)
    m = json.loads((out / "metrics.json").read_text())
    assert sorted(p["id"] for p in preds) == sorted(truth)     # "a table" has no box: not evaluated
    for k in (1, 5, 10):
        hits = sum(max([my_iou(b, t) for b in p["boxes_px"][:k] for t in truth[p["id"]]], default=0.0) >= 0.5
                   for p in preds)
        assert m[f"recall@{k}"] == pytest.approx(hits / len(preds))
    assert m["paper"] == {"metric": "recall@1", "percent": 77.8}
    assert set(m["recall@1_by_category"]) == {"other", "clothing"}
    first = next(p for p in preds if p["id"].endswith("_0_1"))
    assert first["phrase"] == scene_list[0]["objects"][1]["name"]
    assert first["context"] == f"{scene_list[0]['objects'][0]['name']} next to"
    assert "| flickr30k_entities val | recall@1 | 77.80 |" in (out / "summary.md").read_text()


def _compare(capsys, tiny_model_dir: Path, scenes, tmp_path: Path, ann_name: str, a: str, b: str) -> Tuple[Path, dict]:
    """`kosmos2-eval --compare a b` on 4 samples; (its output directory, compare.json)."""
    images, scene_list = scenes
    ann = tmp_path / ann_name
    write_refcoco(ann, scene_list)
    out = tmp_path / "cmp"
    code, _, stderr = run_eval(capsys, "--annotations", str(ann), "--out", str(out), "--limit", "4",
                               "--artifacts-dir", str(tmp_path / "art"), *common(tiny_model_dir, images),
                               "--compare", a, b)
    assert code == 0, stderr
    return out, json.loads((out / "compare.json").read_text())


def test_compare_torch_and_onnxruntime_agree_on_every_token(tiny_model_dir: Path, scenes, tmp_path: Path,
                                                            capsys) -> None:
    out, result = _compare(capsys, tiny_model_dir, scenes, tmp_path, "finetune_refcoco+_testA.json",
                           "backend=torch", "backend=onnxruntime, precision=fp32")
    assert result["samples"] == 4 and result["identical_token_ids"] == 1.0 and result["top_box_agreement"] == 1.0
    assert result["a"]["acc@0.5"] == result["b"]["acc@0.5"]
    assert result["b"]["settings"]["backend"] == "onnxruntime"
    assert (out / "a" / "predictions.jsonl").is_file() and (out / "b" / "metrics.json").is_file()
    assert "identical token ids | 100.00 %" in (out / "compare.md").read_text()
    assert parse_spec("backend=tensorrt, precision=fp16") == {"backend": "tensorrt", "precision": "fp16"}
    with pytest.raises(ValueError):
        parse_spec("backend")


def test_compare_accepts_quantized_weights(tiny_model_dir: Path, scenes, tmp_path: Path, capsys) -> None:
    """The acceptance run the README asks for before a robot relies on int8: fp32 against int8 on
    the same samples, with the settings each ran with (the tiny checkpoint's numbers mean nothing)."""
    _, result = _compare(capsys, tiny_model_dir, scenes, tmp_path, "finetune_refcoco_val.json",
                         "backend=onnxruntime,precision=fp32", "backend=onnxruntime,precision=int8")
    assert result["samples"] == 4 and 0.0 <= result["identical_token_ids"] <= 1.0
    assert (result["a"]["settings"]["precision"], result["b"]["settings"]["precision"]) == ("fp32", "int8")


def test_bad_input_is_one_line_and_a_nonzero_exit(tiny_model_dir: Path, scenes, tmp_path: Path, capsys) -> None:
    images, scene_list = scenes
    base = ["--out", str(tmp_path / "o"), *common(tiny_model_dir, images)]

    def one_line_error(*args: str) -> str:
        code, _, err = run_eval(capsys, *args, *base)
        assert code == 2 and err.startswith("kosmos2-eval: error: ") and err.strip().count("\n") == 0, err
        return err

    assert "not found" in one_line_error("--annotations", str(tmp_path / "absent.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "not an MDETR/COCO annotation file" in one_line_error("--annotations", str(tmp_path / "list.json"))
    (tmp_path / "broken.json").write_text("{")
    assert "not readable JSON" in one_line_error("--annotations", str(tmp_path / "broken.json"))
    (tmp_path / "empty.json").write_text(json.dumps({"images": [], "annotations": [{"image_id": 5, "bbox": [0, 0, 1, 1]}]}))
    err = one_line_error("--annotations", str(tmp_path / "empty.json"))
    assert "no samples" in err and "annotation without an image entry: 1" in err
    root = tmp_path / "flickr"
    write_flickr(root, scene_list, split="val")
    assert "no test.txt" in one_line_error("--annotations", str(root))
    assert "not key=value" in one_line_error("--annotations", str(root), "--compare", "backend", "x=1")
    assert "unknown parameter" in one_line_error("--annotations", str(root), "--compare", "colour=red", "backend=torch")
    # An annotation whose image entry is missing is counted as skipped; the rest still runs.
    ann = tmp_path / "finetune_refcoco_testB.json"
    write_refcoco(ann, scene_list[:1])
    data = json.loads(ann.read_text())
    data["annotations"].append({"id": 99, "image_id": 12345, "bbox": [0, 0, 5, 5]})
    ann.write_text(json.dumps(data))
    code, _, err = run_eval(capsys, "--annotations", str(ann), "--out", str(tmp_path / "ok"),
                            *common(tiny_model_dir, images))
    assert code == 0, err
    m = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert m["counts"]["skipped"] == {"annotation without an image entry": 1} and m["counts"]["evaluated"] == 2
    code, _, err = run_eval(capsys, "--annotations", str(ann), "--out", str(tmp_path / "m"), "--model",
                            str(tmp_path / "no-model"), "--images", str(images), "--no-download")
    assert code == 3 and err.strip().count("\n") == 0


@pytest.mark.parametrize("fmt", ["refcoco", "flickr"])
def test_free_decoding_counts_boxes_as_the_papers_rule_on_transformers_output(fmt: str, tiny_model_dir: Path,
                                                                              scenes, tmp_path: Path,
                                                                              capsys) -> None:
    """Free decoding: candidate boxes are those transformers' own generate + post_process_generation
    give for the entities named as the query, scaled by the image size (the paper's rule)."""
    from transformers import AutoProcessor

    from kosmos2_ros.core.backends.modules import load_kosmos2
    from kosmos2_ros.core.model.reference import reference_generate

    images, scene_list = scenes
    if fmt == "refcoco":
        ann = tmp_path / "finetune_refcoco_testB.json"
        write_refcoco(ann, scene_list)
        extra: List[str] = []
    else:
        ann = tmp_path / "flickr"
        write_flickr(ann, scene_list, split="test")
        extra = ["--split", "test"]
    out = tmp_path / "free"
    code, _, err = run_eval(capsys, "--annotations", str(ann), "--out", str(out), "--decoding", "free",
                            "--max-new-tokens", "24", "--limit", "4", *extra, *common(tiny_model_dir, images))
    assert code == 0, err
    model = load_kosmos2(str(tiny_model_dir))
    processor = AutoProcessor.from_pretrained(str(tiny_model_dir))
    preds = read_predictions(out)
    assert len(preds) == 4 and any(p["boxes_px"] for p in preds)   # the comparison below sees real boxes
    for pred in preds:
        query = pred.get("expression") or pred["phrase"]
        prompt = f"<grounding>{pred['context'].rstrip()}<phrase> {query}</phrase>"
        with Image.open(pred["image"]) as im:
            image = im.convert("RGB")
        ref = reference_generate(model, processor, prompt, image, 24)
        assert pred["token_ids"] == ref.new_ids
        expected = [[x0 * image.width, y0 * image.height, x1 * image.width, y1 * image.height]
                    for phrase, _, found in ref.parsed[1] if " ".join(phrase.split()) == query
                    for x0, y0, x1, y1 in found]
        assert len(pred["boxes_px"]) == len(expected)
        for got, want in zip(pred["boxes_px"], expected):
            assert got == pytest.approx(want, abs=1e-3)


def test_presence_roc_and_auc_on_hand_made_scores() -> None:
    from kosmos2_ros.eval.metrics import auc, presence_and_candidates, roc

    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0 and auc([0.1], [0.9]) == 0.0 and auc([0.5], [0.5]) == 0.5
    curve = roc([0.9, 0.4], [0.5, 0.1])
    assert curve[0] == [0.0, 0.0] and curve[-1] == [1.0, 1.0] and [0.0, 0.5] in curve
    records = [{"presence": 0.9, "iou": [0.7], "candidate_iou": [0.1], "ambiguous": False, "ambiguity": 0.2},
               {"presence": 0.8, "iou": [0.1], "candidate_iou": [0.6], "ambiguous": True, "ambiguity": 0.9},
               {"presence": 0.2, "iou": [0.2], "candidate_iou": [], "ambiguous": False, "ambiguity": 0.0}]
    which = presence_and_candidates(records, [{"presence": 0.3}, {"presence": 0.1}], threshold=0.5, ambiguity_ratio=0.5)
    assert which["acc@0.5_candidates"] == pytest.approx(2 / 3)       # the second one's truth is a candidate
    assert which["by_ambiguous"]["ambiguous"] == {"acc@0.5": 0.0, "samples": 1}
    assert which["by_ambiguous"]["not_ambiguous"] == {"acc@0.5": 0.5, "samples": 2}
    pres = which["presence"]
    assert pres["auc"] == pytest.approx(5 / 6) and pres["false_positive_rate"] == 0.0
    assert pres["miss_rate"] == pytest.approx(1 / 3)
    assert [t for t, _, _ in pres["rates_at"]] == [0.1, 0.2, 0.3, 0.5, 0.7, 0.9]


def test_refcoco_runs_report_candidates_ambiguity_and_presence(tiny_model_dir: Path, scenes, tmp_path: Path,
                                                               capsys) -> None:
    """Each expression also runs on another image of the set (negatives.jsonl) for the presence ROC;
    metrics.json and summary.md carry acc@0.5_candidates, accuracy by the ambiguous flag and presence."""
    images, scene_list = scenes
    ann = tmp_path / "finetune_refcoco_val.json"
    write_refcoco(ann, scene_list)
    out = tmp_path / "which"
    code, _, stderr = run_eval(capsys, "--annotations", str(ann), "--out", str(out), *common(tiny_model_dir, images))
    assert code == 0, stderr
    preds = read_predictions(out)
    negatives = [json.loads(line) for line in (out / "negatives.jsonl").read_text().splitlines()]
    assert {n["id"] for n in negatives} == {p["id"] for p in preds}
    assert all(n["image"] != p["image"] for n, p in zip(sorted(negatives, key=lambda r: r["id"]),
                                                          sorted(preds, key=lambda r: r["id"])))
    m = json.loads((out / "metrics.json").read_text())
    hits = sum(1 for p in preds if p["iou"][0] >= 0.5 or max(p["candidate_iou"] or [0]) >= 0.5)
    assert m["acc@0.5_candidates"] == pytest.approx(hits / len(preds)) and m["acc@0.5_candidates"] >= m["acc@0.5"]
    which = m["which_one"]
    assert which["presence"]["positives"] == which["presence"]["negatives"] == len(preds)
    assert 0.0 <= which["presence"]["auc"] <= 1.0
    split = which["by_ambiguous"]
    assert split["ambiguous"]["samples"] + split["not_ambiguous"]["samples"] == len(preds)
    assert "Presence (each expression on its image vs on another image" in (out / "summary.md").read_text()
    # The three signals of "not there", side by side: presence, the box's score, and the yes/no check
    # ("Is there {expression} in the image?") on the same images.
    from kosmos2_ros.eval.metrics import auc

    signals = m["not_there"]
    for key in ("presence", "score", "yes_probability"):
        pos = [p[key] for p in preds if p[key] is not None and p[key] >= 0]
        neg = [n[key] for n in negatives if n[key] is not None and n[key] >= 0]
        assert signals[key]["positives"] == len(pos) == len(preds) and signals[key]["negatives"] == len(neg)
        assert signals[key]["auc"] == pytest.approx(auc(pos, neg))
    assert all(0.0 <= p["yes_probability"] <= 1.0 for p in preds + negatives)
    assert "Which signal says \"not there\"" in (out / "summary.md").read_text()
    for png in ("presence_roc.png", "accuracy_vs_ambiguity.png", "not_there_roc.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 200


def test_on_the_which_one_toy_presence_and_the_flag_mean_what_they_should(which_one_dir: Path, tmp_path: Path,
                                                                          capsys) -> None:
    """kosmos2-eval on a set whose truth is known (`write_which_one_set`: unseen toy scenes, one named
    object or two that fit, the truth one of the two): presence tells an expression's own image from the
    next (where its object is absent), the truth is among the chosen box and the candidates, and the
    ambiguous results are where the chosen box is wrong about half the time."""
    from kosmos2_ros.fixtures.checkpoints import WHICH_ONE_TEST_IMAGES, write_which_one_set

    ann = write_which_one_set(tmp_path / "toy", WHICH_ONE_TEST_IMAGES)
    out = tmp_path / "eval"
    code, _, stderr = run_eval(capsys, "--annotations", str(ann), "--out", str(out),
                               *common(which_one_dir, tmp_path / "toy"))
    assert code == 0, stderr
    m = json.loads((out / "metrics.json").read_text())
    which = m["which_one"]
    presence = which["presence"]
    assert presence["positives"] == presence["negatives"] == 4 * len(WHICH_ONE_TEST_IMAGES)
    assert presence["auc"] >= 0.95
    at_half = {round(t, 2): (fp, miss) for t, fp, miss in presence["rates_at"]}[0.5]
    assert at_half[0] <= 0.1 and at_half[1] <= 0.1
    assert m["acc@0.5_candidates"] >= 0.9 and m["acc@0.5_candidates"] > m["acc@0.5"]
    split = which["by_ambiguous"]
    two_object = 2 * len(WHICH_ONE_TEST_IMAGES)      # 4 odd expressions on each bright (odd) image
    assert 0.9 * two_object <= split["ambiguous"]["samples"] <= 1.1 * two_object
    assert split["not_ambiguous"]["acc@0.5"] >= 0.9 and split["ambiguous"]["acc@0.5"] < 0.8


# -- questions about a region (ViP-Bench with boxes) ---------------------------------------------
def write_vip_bench(root: Path, scene_list: List[Dict[str, Any]]) -> Path:
    """ViP-Bench's layout: vip-bench-meta-data.json at the root, each source image's boxes in
    source_image/<name>.json (LabelMe rectangles); one item with two <obj>s, which is skipped."""
    (root / "source_image").mkdir(parents=True)
    meta = {}
    for i, scene in enumerate(scene_list):
        stem = Path(scene["file_name"]).stem
        x0, y0, x1, y1 = scene["objects"][0]["box"]
        (root / "source_image" / f"{stem}.json").write_text(json.dumps({"shapes": [
            {"label": "obj", "shape_type": "rectangle", "points": [[x1, y1], [x0, y0]]}]}))   # corners any order
        meta[f"v1_{2 * i}"] = {"image_source": scene["file_name"], "image": f"{stem}_0.png",
                               "question": "Is the object <obj> red?", "answer": "yes" if i % 2 == 0 else "No",
                               "capability": ["rec"]}
        meta[f"v1_{2 * i + 1}"] = {"image_source": scene["file_name"], "image": f"{stem}_1.png",
                                   "question": "What colour is <obj>?", "answer": "red<OR>crimson",
                                   "capability": ["rec", "know"]}
    meta["v1_99"] = {"image_source": scene_list[0]["file_name"], "question": "Is <obj1> left of <obj2>?",
                     "answer": "yes", "capability": ["rel"]}
    path = root / "vip-bench-meta-data.json"
    path.write_text(json.dumps(meta))
    return path


def test_vip_bench_questions_are_read_answered_about_their_box_and_written_for_its_evaluator(
        tiny_model_dir: Path, scenes, tmp_path: Path, capsys) -> None:
    from kosmos2_ros.eval.questions import read_questions

    images, scene_list = scenes
    meta = write_vip_bench(tmp_path / "vip", scene_list)
    questions, skipped = read_questions(str(meta), str(images))
    assert len(questions) == 2 * len(scene_list) and skipped == {"not one <obj> (a box per question)": 1}
    first = questions[0]
    assert first.question == "Is the object [this] red?" and first.expected_yes_no == "yes"
    assert first.bbox == tuple(float(v) for v in scene_list[0]["objects"][0]["box"])
    assert questions[2].expected_yes_no == "no" and questions[1].expected_yes_no == ""
    out = tmp_path / "vip_out"
    code, stdout, stderr = run_eval(capsys, "--questions", str(meta), "--out", str(out),
                                    *common(tiny_model_dir, images))
    assert code == 0, stderr
    results = json.loads((out / "vipbench_results.json").read_text())
    assert set(results) == {q.id for q in questions} and all(isinstance(v, str) for v in results.values())
    assert not any("Question:" in v or "Answer:" in v for v in results.values())    # the answer alone
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    yes_no = [a for a in answers if a["expected"] in ("yes", "no")]
    assert len(yes_no) == len(scene_list) and all(0 <= a["answer_probability"] <= 1 for a in yes_no)
    m = json.loads((out / "metrics.json").read_text())
    right = sum(a["answer"] == a["expected"] for a in yes_no)
    assert m["yes_no"]["accuracy"] == pytest.approx(right / len(yes_no))
    assert m["yes_no"]["questions"] == len(yes_no) and "vipbench_results.json" in stdout


def test_a_plain_question_file_and_its_bad_items(tmp_path: Path) -> None:
    from kosmos2_ros.eval.questions import read_questions

    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in [
        {"id": "a", "image": "x.jpg", "question": "What is [this]?", "bbox": [1, 2, 30, 40], "answer": "a cup"},
        {"id": "b", "image": "x.jpg", "question": "Is there a cup?", "bbox": None, "answer": "Yes."},
        {"id": "c", "image": "x.jpg", "question": "What is this?", "bbox": [5, 5, 5, 9]},
        {"id": "d", "question": "no image"}]))
    questions, skipped = read_questions(str(path), str(tmp_path))
    assert [q.id for q in questions] == ["a", "b"] and questions[0].bbox == (1.0, 2.0, 30.0, 40.0)
    assert questions[1].bbox is None and questions[1].expected_yes_no == "yes"
    assert skipped == {"bad bbox": 1, "no question or image": 1}
    with pytest.raises(datasets.DatasetError, match="does not exist"):
        read_questions(str(tmp_path / "none.json"), str(tmp_path))


def test_yes_no_metrics_on_hand_made_records() -> None:
    records = [{"expected": "yes", "answer": "yes", "answer_probability": 0.9},
               {"expected": "yes", "answer": "no", "answer_probability": 0.4},
               {"expected": "no", "answer": "no", "answer_probability": 0.2},
               {"expected": "no", "answer": "yes", "answer_probability": 0.6},
               {"expected": "a cup", "answer": "", "answer_probability": None}]
    m = metrics.yes_no(records)
    assert (m["questions"], m["yes"], m["no"], m["accuracy"]) == (4, 2, 2, 0.5)
    assert m["auc"] == pytest.approx(0.75)     # 3 of the 4 (yes, no) pairs ordered right
