"""The worker's idle work: standing queries on each camera's newest frame, and encoding ahead.

Runs on the worker thread only when no one-shot command waits (`worker.Worker`'s `idle`),
one frame at a time. Which camera goes next is `core.standing.next_camera` (rate, newest frame
only, fairness across cameras); track ids are `core.tracking`. Results go out on `~/tracks`
(kosmos2_ros/Tracks), and also on `~/detections`, `~/markers` and `~/debug_image` like a
command's.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, List, Optional

from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline, Result, Status
from kosmos2_ros.core.serving.standing import EncodeAhead, next_camera
from kosmos2_ros.msg import TrackedQuery, Tracks

from . import convert
from .camera import Camera


class LiveWork:
    """Standing queries and encoding ahead for the node's cameras (see the module docstring)."""

    def __init__(self, node: Any) -> None:
        self._node = node
        self.encode_ahead = EncodeAhead()
        self.tracks_published = 0

    @property
    def frames_encoded_ahead(self) -> int:
        return self.encode_ahead.frames

    def idle(self, should_stop: Callable[[], bool]) -> Optional[float]:
        """One unit of idle work; seconds until there may be more (None: wait for a new frame)."""
        node = self._node
        pipeline: Optional[Pipeline] = node.active_pipeline()
        if pipeline is None:
            return None
        cfg = node.config
        now = time.monotonic()
        cameras = list(node.cameras.values())
        fresh = {cam.name: cam.fresh_frame(cfg) for cam in cameras}
        name, wait = next_camera([(cam.name, cam.standing, None if fresh[cam.name] is None
                                   else fresh[cam.name].stamp_ns) for cam in cameras], cfg.query_rate_hz, now)
        if name is not None:
            cam = node.cameras[name]
            self.ground_standing(pipeline, cam, fresh[name], should_stop, now)
            return 0.0
        ahead = self.encode_ahead.run(pipeline, [(fresh[cam.name], cam.frames.interval_s) for cam in cameras
                                                 if fresh[cam.name] is not None], cfg.encode_ahead_hz, now)
        if ahead == 0.0:
            return 0.0
        if ahead is not None:
            wait = ahead if wait is None else min(wait, ahead)
        return wait

    def ground_standing(self, pipeline: Pipeline, cam: Camera, frame: Frame, should_stop: Callable[[], bool],
                        now: float) -> None:
        """The camera's standing queries on `frame`: one batch (shared encoding and prompt head)."""
        state = cam.standing
        queries = state.queries
        state.last_stamp, state.last_run = frame.stamp_ns, now
        commands = [Command(id=f"{self._node.get_name()}-tracks-{cam.label}-{k}", task="refer", text=q,
                            camera=cam.name, decoding="constrained") for k, q in enumerate(queries)]
        results = pipeline.run_batch(commands, frame, should_stop=should_stop)
        if any(r.status is Status.CANCELLED for r in results) or queries != state.queries:
            return   # stopped, or the queries changed meanwhile: nothing stale goes out
        errors = [r.error for r in results if r.status is Status.MODEL_ERROR]
        if errors:
            raise RuntimeError(f"standing queries on camera {cam.label}: {errors[0]}")
        self._node.place_geometry(results)
        msg = self.tracks_message(cam, frame, queries, results)
        self._node.publish_tracks(msg, frame, self.combined(cam, frame, msg, results))
        state.published += 1
        self.tracks_published += 1

    @staticmethod
    def tracks_message(cam: Camera, frame: Frame, queries: tuple, results: List[Result]) -> Tracks:
        """One Tracks message: an entry per query (found or not), with its track id."""
        msg = Tracks(header=convert.header_of(frame.stamp_ns, frame.frame_id), camera=cam.name,
                     image_width=frame.width, image_height=frame.height,
                     geometry_frame_id=next((r.geometry_frame_id for r in results if r.geometry_frame_id), frame.frame_id))
        for query, res in zip(queries, results):
            entry = TrackedQuery(query=query, token_ids=[int(t) for t in res.token_ids])
            if res.status is Status.OK:
                one = convert.result_to_msg(res, masks=False)
                entry.presence, entry.candidates = one.presence, one.candidates
                entry.ambiguous, entry.ambiguity = one.ambiguous, one.ambiguity
            if res.status is Status.OK and res.objects:
                entry.found = True
                entry.objects = one.objects
                best = max(res.objects, key=lambda o: (o.score if o.score == o.score else -1.0))
                entry.track_id = cam.standing.tracker.update(query, best.box_px)
            else:
                cam.standing.tracker.update(query, None)
            msg.queries.append(entry)
        if results:
            msg.encode_ms = float(results[0].timings_ms.get("encode", 0.0))
            msg.generate_ms = float(results[0].timings_ms.get("generate", 0.0))
        return msg

    @staticmethod
    def combined(cam: Camera, frame: Frame, msg: Tracks, results: List[Result]) -> Result:
        """All of a frame's query boxes as one Result, each named `query #track` (debug image, markers)."""
        res = Result(id=f"tracks-{cam.label}", task="refer", stamp_ns=frame.stamp_ns, frame_id=frame.frame_id,
                     width=frame.width, height=frame.height, camera=cam.name, geometry_frame_id=msg.geometry_frame_id)
        for index, (entry, one) in enumerate(zip(msg.queries, results)):
            for obj in one.objects:
                res.objects.append(replace(obj, phrase=f"{entry.query} #{entry.track_id}", entity_index=index))
        return res
