"""~/target/*: the arm's target republished as the inputs common consumers take, without glue.

Each message at the source image's stamp, latched (a planner that subscribes later gets the
latest target), poses in `geometry_frame_id` (`target_frame`, or the camera's):

- `~/target/grasp` (geometry_msgs/PoseStamped): MoveIt and pick pipelines (z approaches, y closes);
- `~/target/pose` (PoseStamped of the 3D box) and `~/target/size` (geometry_msgs/Vector3Stamped);
- `~/target/mask` (sensor_msgs/Image mono8, 255 on the object, the source image's size and header):
  FoundationPose's segmentation input, Contact-GraspNet wrappers;
- `~/target/cloud` (PointCloud2 of the object alone, xyz + rgb): GraspGen's node;
- with `collision_object: true` and moveit_msgs installed, a moveit_msgs/CollisionObject (a box, id
  the command's id or the standing query's track, ADD then MOVE) on `collision_object_topic`
  (`moveit_adapter.py`).

Which result's object: `core.serving.target.choose_target` (OK, unambiguous refer or region, valid
geometry); for standing queries, the one named by `target_query` (its fused pose).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
from geometry_msgs.msg import PoseStamped, Vector3Stamped
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, PointCloud2

from kosmos2_ros.core.serving.results import GroundedBox, Result, describe_object
from kosmos2_ros.core.serving.target import choose_target

from . import convert
from .moveit_adapter import CollisionObjects

#: Latched: the latest target waits for a planner that subscribes after it was published.
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


class TargetPublishers:
    """The target topics of one node."""

    def __init__(self, node: Any, root: str = "~/target") -> None:
        """`root`: where the topics live (a camera's own under camera_topics). The CollisionObject publisher
        (`collision`) is the node's to set, at configure, and on its own target only."""
        self._node = node
        self.grasp = node.create_publisher(PoseStamped, f"{root}/grasp", LATCHED)
        self.pose = node.create_publisher(PoseStamped, f"{root}/pose", LATCHED)
        self.size = node.create_publisher(Vector3Stamped, f"{root}/size", LATCHED)
        self.mask = node.create_publisher(Image, f"{root}/mask", LATCHED)
        self.cloud = node.create_publisher(PointCloud2, f"{root}/cloud", LATCHED)
        self.collision: Optional[CollisionObjects] = None

    def offer(self, res: Result, object_id: str) -> bool:
        """Publish `res`'s object as the target if it names one (`choose_target`); False otherwise."""
        obj, _ = choose_target(res)
        if obj is None:
            return False
        self.publish(res, obj, object_id)
        return True

    def publish(self, res: Result, obj: GroundedBox, object_id: str) -> None:
        d = describe_object(obj)
        geo_header = convert.header_of(res.stamp_ns, res.geometry_frame_id or res.frame_id)
        self.grasp.publish(convert.fill(PoseStamped(header=geo_header), {"pose": d["grasp"]}))
        self.pose.publish(convert.fill(PoseStamped(header=geo_header), {"pose": d["pose"]}))
        self.size.publish(convert.fill(Vector3Stamped(header=geo_header), {"vector": d["size"]}))
        mask = obj.geometry.mask
        if mask is not None:
            labels = np.where(mask, 255, 0).astype(np.uint8)
            self.mask.publish(convert.mono8_image(labels, convert.header_of(res.stamp_ns, res.frame_id)))
        cloud = convert.object_cloud(obj.geometry, geo_header)
        if cloud is not None:
            self.cloud.publish(cloud)
        if self.collision is not None:
            self.collision.publish(object_id, geo_header, d["pose"], d["size"])

    def destroy(self) -> None:
        for pub in (self.grasp, self.pose, self.size, self.mask, self.cloud):
            self._node.destroy_publisher(pub)
