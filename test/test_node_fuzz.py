"""Hostile but well-formed messages against one node process: every command answered, the node alive;
its own DDS domain.

Hypothesis draws images (any encoding name, size, step, data length, endianness; compressed
images of random bytes) and commands (random unicode and control tokens, random tasks,
regions with NaN/inf/huge coordinates, random image stamps). Every command must be answered
exactly once, and the node must stay up and serve a good command at the end.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from node_helpers import Tester, free_domain, rgb_image_msg, running_node, scene

DOMAIN = free_domain()
OK = 0
ENCODINGS = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "16UC1", "32FC1", "8UC3", "8UC1", "yuv422",
             "bayer_rggb8", "bayer_grbg16", "rgb16", "", "RGB8", "jpeg", "\u00e9ncoding", "rgb8\x00x", "x" * 300]
CONTROL = ["<grounding>", "<phrase>", "</phrase>", "<object>", "</object>", "<patch_index_0000>",
           "<patch_index_1023>", "<image>", "</image>", "</delimiter_of_multi_objects/>", "<s>", "</s>", "<pad>",
           "<unk>", "[", "]", "\x00", "\n", "\u202e", "\ufeff"]
TASKS = ["refer", "caption", "describe", "vqa", "phrase_grounding", "region", "", "REFER", "fly", "caption\x00",
         "\u2603"]
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 0.0, 1e-45, 63.0]))

MAX_STAMP = 2**31 * 10**9 - 1      # builtin_interfaces/Time: int32 seconds

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def node(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    log = tmp_path_factory.mktemp("fuzz_node") / "node.log"
    with running_node({"model": str(tiny_model_dir), "use_compressed": True, "max_frame_age_s": 0,
                       "queue_size": 64, "max_new_tokens": 6, "max_new_tokens_limit": 64}, DOMAIN, log) as running:
        yield running


@st.composite
def images(draw: Any) -> Any:
    from sensor_msgs.msg import CompressedImage, Image

    from kosmos2_ros.ros.convert import header_of

    header = header_of(draw(st.integers(0, MAX_STAMP)), draw(st.text(max_size=20).filter(lambda s: "\x00" not in s)))
    if draw(st.booleans()):
        fmt = draw(st.sampled_from(["jpeg", "png", "", "rgb8; jpeg compressed bgr8", "bmp", "\u2603"]))
        return CompressedImage(header=header, format=fmt, data=draw(st.binary(max_size=3000)))
    height, width = draw(st.integers(0, 70)), draw(st.integers(0, 70))
    step = draw(st.one_of(st.integers(0, 300), st.just(width * 3), st.just(width * 4), st.integers(0, 2**32 - 1)))
    size = draw(st.one_of(st.just(height * step), st.integers(0, 20_000)))
    size = min(size, 300_000)
    return Image(header=header, height=height, width=width, encoding=draw(st.sampled_from(ENCODINGS)),
                 is_bigendian=draw(st.integers(0, 255)), step=step, data=draw(st.binary(min_size=min(size, 64),
                                                                                       max_size=64)) * (size // 64 + 1))


def text_strategy() -> Any:
    pieces = st.one_of(st.text(max_size=40), st.sampled_from(CONTROL))
    return st.lists(pieces, max_size=8).map("".join)


@st.composite
def commands(draw: Any, cmd_id: str) -> Any:
    from kosmos2_ros.msg import GroundingCommand, PixelBox
    from kosmos2_ros.ros.convert import ns_to_stamp

    stamp = draw(st.one_of(st.just(0), st.integers(0, MAX_STAMP)))
    msg = GroundingCommand(id=cmd_id, task=draw(st.sampled_from(TASKS)), text=draw(text_strategy()),
                           max_new_tokens=draw(st.one_of(st.just(0), st.integers(0, 2**32 - 1),
                                                         st.integers(1, 8))),
                           decoding=draw(st.sampled_from(["", "free", "constrained", "nope", "\x00"])),
                           image_stamp=ns_to_stamp(stamp))
    if draw(st.booleans()):
        msg.use_region = True
        msg.region = PixelBox(x_min=draw(FLOATS), y_min=draw(FLOATS), x_max=draw(FLOATS), y_max=draw(FLOATS))
    return msg


_counter = [0]
_sent: list = []      # ids actually published (hypothesis may abandon an example mid-draw)


def _send_and_check(t: Tester, image: Any, cmds: list) -> None:
    from sensor_msgs.msg import CompressedImage

    if image is not None:
        (t.compressed_pub if isinstance(image, CompressedImage) else t.image_pub).publish(image)
        time.sleep(0.02)
    for cmd in cmds:
        t.command_pub.publish(cmd)
        _sent.append(cmd.id)
    for cmd in cmds:
        res = t.wait_result(cmd.id, timeout=30)
        assert res.id == cmd.id and 0 <= res.status <= 7
        if res.status != OK:
            assert res.error, f"status {res.status} without a reason"


@settings(max_examples=45, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_hostile_messages_are_each_answered_once(node: tuple, data: Any) -> None:
    proc, t = node
    image = data.draw(st.one_of(st.none(), images()), label="image")
    cmds = []
    for _ in range(data.draw(st.integers(1, 3), label="n_commands")):
        _counter[0] += 1
        cmds.append(data.draw(commands(f"fuzz-{_counter[0]}"), label="command"))
    _send_and_check(t, image, cmds)
    assert proc.alive(), proc.log()[-3000:]


def test_after_the_fuzz_every_result_was_unique_and_a_good_command_works(node: tuple) -> None:
    proc, t = node
    sent = list(_sent)
    assert len(sent) >= 45
    time.sleep(0.5)
    bad = {i: [(r.status, r.error[:80]) for r in t.results.get(i, [])] for i in sent if len(t.results.get(i, [])) != 1}
    assert not bad, bad
    stamp = 1_800_000_000_000_000_000
    t.image_pub.publish(rgb_image_msg(scene(64, 48), stamp, "after_fuzz"))
    res = t.wait_frame(stamp)
    assert res.status == OK, res.error
    res = t.run(t.command("after-fuzz", "refer", "the red box"))
    assert res.status == OK and res.header.frame_id == "after_fuzz"
    assert proc.alive()
