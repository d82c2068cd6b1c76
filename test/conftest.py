"""Shared fixtures: tiny Kosmos-2 checkpoints built and saved once per test session.

- `tiny_model_dir`: the package's helper, trained for seconds on synthetic coloured squares, so
  greedy decoding writes phrases, boxes and eos (structured, not good).
- `tiny_untrained_dir`: the package's helper with random weights (sharpened logits).
- `which_one_dir`: `tiny_model_dir` trained further (~35 s) on the "which one" toy
  (`checkpoints.which_one_cells`: an expression's object absent, there once, or twice).
- `hf_saved_model_dir`: built with transformers and `tokenizers` alone (no package code) and
  saved with `save_pretrained`: a checkpoint saved by transformers itself, with no package code in it. Its
  image processor resizes the shortest edge and centre-crops, the other processor mode.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from node_helpers import free_domain

#: Set by scripts/test_jetson_versions.sh: a Python with no ROS (JetPack's versions on Python 3.10). Test modules
#: that use ROS (rclpy, the messages, the node) are left out, each named in the header; every other one runs.
WITHOUT_ROS = os.environ.get("KOSMOS2_TESTS_WITHOUT_ROS") == "1"
#: The launch file's logic (launch_args, topics) is plain Python, and Humble runs it on Python 3.10.
ROS_MARKS = re.compile(r"^\s*(import rclpy|from rclpy|from \w+_msgs\b|from ament_index_python\b"
                       r"|from kosmos2_ros\.(msg|srv|action)\b"
                       r"|(from|import) kosmos2_ros\.ros(?!(\.launch_args|\.topics)? import (launch_args|topics|"
                       r"LaunchArgumentError|camera_info_for|compressed_for)\b)|from node_helpers import (?!free_domain\b))",
                       re.M)


def needs_ros(path: Path) -> bool:
    """A test module that imports ROS anywhere (at the top or inside a test)."""
    return bool(ROS_MARKS.search(path.read_text(encoding="utf-8")))


collect_ignore = sorted(p.name for p in Path(__file__).parent.glob("test_*.py") if needs_ros(p)) if WITHOUT_ROS else []


def pytest_report_header(config: pytest.Config) -> str:
    if not WITHOUT_ROS:
        return ""
    return (f"without ROS: {len(collect_ignore)} test modules that use ROS left out ({' '.join(collect_ignore)}), "
            "and the tests marked `ros` in the others deselected")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Without ROS, tests marked `ros` are deselected (counted as deselected, never as skipped or passed)."""
    if not WITHOUT_ROS:
        return
    ros = [item for item in items if item.get_closest_marker("ros")]
    if ros:
        config.hook.pytest_deselected(items=ros)
        items[:] = [item for item in items if not item.get_closest_marker("ros")]


os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
# In-process rclpy (the convert and QoS tests) joins a domain this run holds alone.
os.environ["ROS_DOMAIN_ID"] = str(free_domain())
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HF_CORPUS = (
    "A photo of a cat sitting on a sofa next to a lamp.",
    "Describe this image in detail: two people ride bicycles along a river.",
    "Question: Where is the dog? Answer: the dog is under the table.",
    "An image of a snowman warming himself by a fire.",
    "a red square, a blue circle, a green triangle, the left, the right, the top. It is here.",
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Kosmos-2 + processor saved by the package's helper, trained for seconds."""
    from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_kosmos2"), train=True)


@pytest.fixture(scope="session")
def which_one_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint trained on the "which one" toy: absent objects answer with text, two-object
    scenes with either box (presence, candidates and the ambiguity flag have something to find)."""
    from kosmos2_ros.fixtures.checkpoints import build_which_one_checkpoint

    return build_which_one_checkpoint(str(tiny_model_dir), str(tmp_path_factory.mktemp("which_one")))


@pytest.fixture(scope="session")
def tiny_untrained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Kosmos-2 with random (sharpened) weights, saved by the package's helper."""
    from kosmos2_ros.fixtures.checkpoints import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_kosmos2_random"), train=False)


def build_hf_checkpoint(out: Path, seed: int = 1) -> Path:
    """A tiny Kosmos-2 built and saved with transformers and tokenizers only (no package code)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        Kosmos2Config,
        Kosmos2ForConditionalGeneration,
        Kosmos2Processor,
        XLMRobertaTokenizerFast,
    )

    raw = Tokenizer(models.Unigram())
    raw.normalizer = normalizers.NFKC()
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    raw.train_from_iterator(list(HF_CORPUS) * 3, trainer=trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tokenizer = XLMRobertaTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<unk>")
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 224}, do_center_crop=True, crop_size={"height": 224, "width": 224},
        do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True, resample=3)
    processor = Kosmos2Processor(image_processor, tokenizer)
    tok = processor.tokenizer
    torch.manual_seed(seed)
    config = Kosmos2Config(
        text_config=dict(vocab_size=len(tok), embed_dim=48, layers=2, attention_heads=4, ffn_dim=96,
                         max_position_embeddings=512, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        latent_query_num=64)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model = Kosmos2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # sharper logits than the default init, so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_saved_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Kosmos-2 + processor built and saved by transformers itself (not the package's helper)."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("hf_kosmos2"))


@pytest.fixture(scope="session")
def result_with_geometry():
    """A refer result about a rendered box (640x480, 0.8 m): one object with geometry from noisy depth,
    one without (no depth in its box). `.scene` is the rendered scene; tests change copies only."""
    import numpy as np

    from kosmos2_ros.core.serving.results import GroundedBox, Result
    from kosmos2_ros.core.spatial.object_geometry import ObjectGeometry, object_geometry
    from kosmos2_ros.fixtures.rgbd_scenes import SceneObject, noisy_depth, render

    scene = render([SceneObject("box", (0.0, 0.0), (0.1, 0.08, 0.1), yaw=0.3, colour=(200, 40, 40))], 640, 480,
                   distance=0.8)
    truth = scene.truths[0]
    geo = object_geometry(truth.box, scene.rgb, noisy_depth(scene.depth_m, np.random.default_rng(0)),
                          scene.intrinsics, (20, 15))
    assert geo.valid, geo.error
    res = Result(id="a", task="refer", stamp_ns=1_700_000_123_456_789_000, frame_id="cam_optical", width=640,
                 height=480, geometry_frame_id="cam_optical")
    res.objects = [GroundedBox("the box", 0, (0, 7), truth.box, (0.1, 0.1, 0.5, 0.5), 0.9, (0.0, 0.0, 0.8), geo),
                   GroundedBox("the other", 1, (8, 17), (0, 0, 10, 10), (0, 0, 0.1, 0.1), 0.5, None,
                               ObjectGeometry.invalid("no valid depth inside the box (0 of 100 pixels)"))]
    res.scene = scene   # type: ignore[attr-defined]
    return res
