"""Each camera's own command and output topics (parameter camera_topics), for robots sharing one node.

With several robots' cameras on one node (`cameras: [r1/front, r2/front]`), a result with a 640x480
mask and clouds should cross the WiFi only to the robot that asked, and a robot should not need to
know which node (shard) serves its camera. So each named camera gets, under its own name:

    <camera>/kosmos2/command   GroundingCommand in (its camera field empty or this camera)
    <camera>/kosmos2/ground    Ground service
    <camera>/kosmos2/result    this camera's results only (reliable, deep history)
    <camera>/kosmos2/tracks    this camera's standing-query answers
    <camera>/kosmos2/target/*  the arm's target from this camera's results

beside the node's own ~/command, ~/result, ... (which still carry everything; DDS sends a topic's
data only to its subscribers, so no robot pays for the node-wide topics it does not read).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.pipeline import Status
from kosmos2_ros.msg import GroundingCommand, GroundingResult, Tracks
from kosmos2_ros.srv import Ground

from . import convert
from .command_intake import COMMAND_HISTORY, without_event_waitables
from .publishing import RESULT_HISTORY
from .target import TargetPublishers
from .topics import camera_interface


class CameraInterface:
    """One camera's command topic, service and output topics."""

    def __init__(self, node: Any, camera: str, group: Any) -> None:
        self._node = node
        self.camera = camera
        reliable = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=RESULT_HISTORY,
                              reliability=ReliabilityPolicy.RELIABLE)
        self.result = node.create_publisher(GroundingResult, camera_interface(camera, "result"), reliable)
        self.tracks = node.create_publisher(Tracks, camera_interface(camera, "tracks"), 10)
        self.targets = TargetPublishers(node, root=camera_interface(camera, "target"))
        self.command = node.create_subscription(GroundingCommand, camera_interface(camera, "command"),
                                                self._on_command, COMMAND_HISTORY, callback_group=group,
                                                event_callbacks=without_event_waitables())
        self.service = node.create_service(Ground, camera_interface(camera, "ground"), self._on_ground,
                                           callback_group=group)

    def _command(self, msg: GroundingCommand) -> Tuple[Any, str]:
        """The command for this camera; one naming another camera is answered INVALID (on this camera's
        result topic too, so the robot that sent it hears why)."""
        cmd = convert.command_from_msg(msg)
        if cmd.camera and cmd.camera != self.camera:
            wrong = cmd.camera
            cmd.camera = self.camera
            return cmd, (f"command names camera {wrong!r} on {self.command.topic_name}, which serves camera "
                         f"{self.camera!r} (leave camera empty, or send it to {wrong}'s own topic)")
        cmd.camera = self.camera
        return cmd, ""

    def _on_command(self, msg: GroundingCommand) -> None:
        cmd, refusal = self._command(msg)
        if refusal:
            self._node.refuse(cmd, Status.INVALID, refusal)
        else:
            self._node.submit(cmd)

    def _on_ground(self, request: Ground.Request, response: Ground.Response) -> Ground.Response:
        cmd, refusal = self._command(request.command)
        job = self._node.refuse(cmd, Status.INVALID, refusal) if refusal else self._node.submit(cmd)
        response.result = self._node.answer(job)
        return response

    def destroy(self) -> None:
        """Commands in first (no new ones), then the outputs."""
        node = self._node
        node.destroy_subscription(self.command)
        node.destroy_service(self.service)
        node.destroy_publisher(self.result)
        node.destroy_publisher(self.tracks)
        self.targets.destroy()


def camera_interfaces(node: Any, config: Kosmos2Config, group: Any) -> Dict[str, CameraInterface]:
    """One CameraInterface per named camera when camera_topics is on, else none."""
    if not config.camera_topics:
        return {}
    return {name: CameraInterface(node, name, group) for name in config.cameras}
