"""kosmos2-ground as a user runs it: a subprocess, JSON out, compared with transformers itself."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kosmos2_ros.core.model.reference import reference_generate
from kosmos2_ros.fixtures.scenes import draw_scene

MAX_NEW = 12
CASES = [
    ("refer", "a red square", None),
    ("phrase_grounding", "a man with [a red square]", None),
    ("caption", "", None),
    ("describe", "", None),
    ("region", "", (40.0, 30.0, 200.0, 150.0)),
    ("vqa", "What is on the table?", None),
    ("vqa", "What is [this] used for?", (40.0, 30.0, 200.0, 150.0)),      # a question about a region
    ("check", "Is [this] red?", (40.0, 30.0, 200.0, 150.0)),             # yes/no, with p(yes)
    ("check", "Is there a red square?", None),
    ("raw", "An image of", None),
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    args = args if "--backend" in args else (*args, "--backend", "torch")   # auto would export into ~/.cache
    return subprocess.run([sys.executable, "-m", "kosmos2_ros.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rgb, _ = draw_scene(331, 247, np.random.default_rng(3))   # odd-sized, non-square
    path = tmp_path_factory.mktemp("cli") / "scene.png"
    Image.fromarray(rgb).save(path)
    return path


def reference(model_dir: Path, image_path: Path, task: str, text: str, region) -> list:
    """transformers' own generate + post_process_generation for each prompt the task needs."""
    from transformers import AutoProcessor

    from kosmos2_ros.core.backends.modules import load_kosmos2
    from kosmos2_ros.core.model.tasks import Task, TaskRequest, build_prompts
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.core.spatial.geometry import InputGeometry

    processor = AutoProcessor.from_pretrained(model_dir)
    model = load_kosmos2(model_dir)
    image = Image.open(image_path).convert("RGB")
    frame = Frame(np.asarray(image))
    region_norm = None
    if region is not None:
        region_norm = InputGeometry.from_processor(processor.image_processor, frame.width, frame.height).to_normalized(region)
    out = []
    for prompt in build_prompts(TaskRequest(Task(task), text, region_norm)):
        ref = reference_generate(model, processor, prompt.text, image, MAX_NEW, bboxes=prompt.bboxes)
        out.append((ref.new_ids, ref.parsed))
    return out


@pytest.mark.parametrize("task,text,region", CASES)
def test_cli_matches_transformers(hf_saved_model_dir: Path, image_path: Path, task, text, region) -> None:
    args = ["--model", str(hf_saved_model_dir), "--image", str(image_path), "--task", task, "--decoding", "free",
            "--max-new-tokens", str(MAX_NEW), "--json", "--no-download"]
    if text:
        args += ["--text", text]
    if region:
        args += ["--region", *map(str, region)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["status"] == "ok"
    assert set(got) >= {"text", "entities", "token_ids", "timings_ms"}
    ref = reference(hf_saved_model_dir, image_path, task, text, region)
    assert got["token_ids"] == [t for ids, _ in ref for t in ids]
    if task != "phrase_grounding":
        (_, (ref_text, ref_entities)), = ref
        assert got["text"] == ref_text
        assert [(e["phrase"], tuple(e["span"]), [tuple(b) for b in e["boxes_norm"]]) for e in got["entities"]] == \
            [(p, tuple(s), [tuple(b) for b in boxes]) for p, s, boxes in ref_entities]
    for entity in got["entities"]:
        assert len(entity["boxes_px"]) == len(entity["boxes_norm"]) == len(entity["scores"])
    if task == "check":
        assert got["answer"] in ("yes", "no") and 0.0 <= got["answer_probability"] <= 1.0
        assert (got["answer"] == "yes") == (got["answer_probability"] >= 0.5)
    else:
        assert got["answer"] == "" and got["answer_probability"] == -1.0


def test_cli_annotate_writes_image(tiny_model_dir: Path, image_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "annotated.png"
    proc = run_cli("--model", str(tiny_model_dir), "--image", str(image_path), "--text", "a red square",
                   "--decoding", "constrained", "--annotate", str(out), "--json", "--no-download")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert len(got["entities"]) == 1 and got["entities"][0]["boxes_px"]
    img = np.asarray(Image.open(out))
    assert img.shape == (247, 331, 3)
    assert not np.array_equal(img, np.asarray(Image.open(image_path)))   # boxes were drawn


def test_cli_reports_what_the_node_reports_with_depth_and_candidates(tiny_model_dir: Path, image_path: Path,
                                                                    tmp_path: Path) -> None:
    """The node's options on the command line: a depth PNG (millimetres) and K give every object a 3D point
    (a wall 1.2 m away), candidates come back as the message's `candidates`, and the JSON names every
    message field (it is the result's one description)."""
    depth = tmp_path / "depth.png"
    Image.fromarray(np.full((247, 331), 1200, dtype=np.uint16)).save(depth)
    proc = run_cli("--model", str(tiny_model_dir), "--image", str(image_path), "--text", "a red square", "--json",
                   "--no-download", "--depth", str(depth), "--intrinsics", "300", "300", "165", "123",
                   "--max-candidates", "2", "--presence-threshold", "0", "--describe-candidates")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["objects"] and all(o["point_valid"] and o["point"]["z"] == pytest.approx(1.2) for o in got["objects"])
    assert len(got["candidates"]) <= 2 and all(c["point_valid"] for c in got["candidates"])
    assert {"presence", "not_found_reason", "ambiguous", "ambiguity", "geometry_frame_id", "header"} <= set(got)
    alone = run_cli("--model", str(tiny_model_dir), "--image", str(image_path), "--no-download", "--depth", str(depth))
    assert alone.returncode == 2 and "--depth and --intrinsics go together" in alone.stderr


@pytest.mark.parametrize("args,needle", [
    (["--image", "/nonexistent/x.png"], "cannot read image"),
    (["--task", "nope"], "invalid choice"),
    (["--task", "region"], "--region"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
])
def test_cli_bad_arguments_one_line(tiny_model_dir: Path, image_path: Path, args, needle) -> None:
    base = ["--model", str(tiny_model_dir), "--image", str(image_path), "--no-download"]
    proc = run_cli(*base, *args)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_runs_quantized_graphs(tiny_model_dir: Path, image_path: Path, tmp_path: Path) -> None:
    """`--precision int4` on onnxruntime: quantized into --artifacts-dir, a result, and the one line
    saying this checkpoint is too small for its error to mean anything."""
    proc = run_cli("--model", str(tiny_model_dir), "--image", str(image_path), "--text", "a red square", "--json",
                   "--no-download", "--backend", "onnxruntime", "--precision", "int4", "--artifacts-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "ok"
    assert "int4; this checkpoint is too small to quantize sensibly" in proc.stderr
    assert list(tmp_path.glob("onnx/*/int4/decoder/decoder.onnx"))
    refused = run_cli("--model", str(tiny_model_dir), "--image", str(image_path), "--no-download",
                      "--backend", "torch", "--precision", "int8")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "backend torch runs fp32, fp16, bf16, not int8 (use backend: onnxruntime)" in refused.stderr


def test_cli_missing_model_says_what_was_tried(image_path: Path, tmp_path: Path) -> None:
    proc = run_cli("--model", str(tmp_path / "no-such-model"), "--image", str(image_path), "--no-download")
    assert proc.returncode == 3
    assert "Tried:" in proc.stderr and "local copy" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_invalid_prompt_is_a_command_error(tiny_model_dir: Path, image_path: Path) -> None:
    proc = run_cli("--model", str(tiny_model_dir), "--image", str(image_path), "--text", "a <patch_index_0042> mug",
                   "--json", "--no-download")
    assert proc.returncode == 4
    got = json.loads(proc.stdout)
    assert got["status"] == "invalid" and "control token" in got["error"]
