"""The worker's idle work: standing queries and checks on each camera's newest frame, and encoding ahead.

Runs on the worker thread only when no one-shot command waits (`worker.Worker`'s `idle`),
one frame at a time. Which camera goes next is `core.standing.next_camera` (rate, newest frame
only, fairness across cameras); track ids are `core.tracking`. Results go out on `~/tracks`
(kosmos2_ros/Tracks), and also on `~/detections`, `~/markers` and `~/debug_image` like a
command's. Standing checks (yes/no questions) are asked after the frame's queries, each about its
[bracketed] query's box on this frame or about the whole image, and answered on the same message.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, List, Optional

from kosmos2_ros.core.model.tasks import unmarked_caption
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline, Result, Status
from kosmos2_ros.core.serving.standing import EncodeAhead, asked_about, next_camera
from kosmos2_ros.msg import PixelBox, TrackedCheck, TrackedQuery, Tracks

from . import convert
from .camera import Camera


def best_index(objects: List[Any]) -> int:
    """The highest-scoring object's index (a NaN score counts as none): a query's box on its track, and the
    box its standing checks are asked about."""
    return max(range(len(objects)), key=lambda i: objects[i].score if objects[i].score == objects[i].score else -1.0)


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
        # Newest frames, not yet decoded: a compressed frame is decoded only when the work below uses it.
        fresh = {cam.name: cam.fresh_frame(cfg, decode=False) for cam in cameras}
        name, wait = next_camera([(cam.name, cam.standing, None if fresh[cam.name] is None
                                   else fresh[cam.name].stamp_ns) for cam in cameras], cfg.query_rate_hz, now)
        if name is not None:
            cam = node.cameras[name]
            chosen = fresh[name]
            assert chosen is not None          # next_camera picks only cameras with a frame
            frame = cam.ready(chosen, cfg)
            if frame is not None:
                self.ground_standing(pipeline, cam, frame, should_stop, now)
            return 0.0
        owner = {id(f): cam for cam in cameras for f in (fresh[cam.name],) if f is not None}
        ahead = self.encode_ahead.run(pipeline, [(fresh[cam.name], cam.frames.interval_s) for cam in cameras
                                                 if fresh[cam.name] is not None], cfg.encode_ahead_hz, now,
                                      ready=lambda f: owner[id(f)].decode_pixels(f))
        if ahead == 0.0:
            return 0.0
        if ahead is not None:
            wait = ahead if wait is None else min(wait, ahead)
        return wait

    def ground_standing(self, pipeline: Pipeline, cam: Camera, frame: Frame, should_stop: Callable[[], bool],
                        now: float) -> None:
        """The camera's standing queries on `frame`: one batch (shared encoding and prompt head); then its
        checks, one batch, each about its query's box from the first."""
        state = cam.standing
        queries, checks = state.queries, state.checks
        state.last_stamp, state.last_run = frame.stamp_ns, now
        commands = [Command(id=f"{self._node.get_name()}-tracks-{cam.label}-{k}", task="refer", text=q,
                            camera=cam.name, decoding="constrained") for k, q in enumerate(queries)]
        results = pipeline.run_batch(commands, frame, should_stop=should_stop) if commands else []
        if any(r.status is Status.CANCELLED for r in results):
            return   # stopped: nothing half-done goes out
        # A check that fails (or is stopped) says so on its own entry; the queries' tracks go out all the same.
        asked, answers = self.ask_checks(pipeline, cam, frame, queries, checks, results, should_stop)
        if (queries, checks) != (state.queries, state.checks):
            return   # the queries changed meanwhile: nothing stale goes out
        errors = [r.error for r in results if r.status is Status.MODEL_ERROR]
        if errors:
            raise RuntimeError(f"standing queries on camera {cam.label}: {errors[0]}")
        self._node.place_geometry(results)
        config = self._node.config
        msg = self.tracks_message(cam, frame, queries, results, config.track_hold_s)
        msg.checks = self.check_entries(checks, asked, answers)
        self._node.publish_tracks(msg, frame, self.combined(cam, frame, msg, results))
        if config.target_query in queries:     # its fused object is the arm's target, named by its track
            k = queries.index(config.target_query)
            self._node.offer_target(results[k], f"{cam.label}/{config.target_query}#{msg.queries[k].track_id}")
        state.published += 1
        self.tracks_published += 1

    def ask_checks(self, pipeline: Pipeline, cam: Camera, frame: Frame, queries: tuple, checks: tuple,
                   results: List[Result], should_stop: Callable[[], bool]) -> tuple:
        """The checks' commands run as one batch: ([(check, about, region or None, why not asked)], results of
        those asked). A check about a query that has no box on this frame is not asked."""
        asked: List[tuple] = []
        commands: List[Command] = []
        for k, check in enumerate(checks):
            about = asked_about(check, queries)
            region, why = None, ""
            if about:
                res = results[queries.index(about)]
                if res.status is Status.OK and res.objects:
                    region = tuple(res.objects[best_index(res.objects)].box_px)
                else:
                    why = f"{about!r} was not found on this frame"
            try:
                text = check if region else unmarked_caption(check)
            except ValueError as exc:     # unbalanced [brackets]: said on the entry, every frame
                why = str(exc)
            asked.append((check, about, region, why))
            if not why:
                commands.append(Command(id=f"{self._node.get_name()}-checks-{cam.label}-{k}", task="check",
                                        text=text, region_px=region, camera=cam.name, max_new_tokens=1))
        answers = pipeline.run_batch(commands, frame, should_stop=should_stop) if commands else []
        return asked, answers

    @staticmethod
    def check_entries(checks: tuple, asked: List[tuple], answers: List[Result]) -> List[TrackedCheck]:
        """A TrackedCheck per standing check, in order: its answer and p(yes), or why it was not answered."""
        it = iter(answers)
        entries = []
        for check, about, region, why in asked:
            entry = TrackedCheck(question=check, about=about, answer_probability=-1.0, error=why)
            if region is not None:
                entry.region = PixelBox(x_min=float(region[0]), y_min=float(region[1]),
                                        x_max=float(region[2]), y_max=float(region[3]))
            if not why:
                res = next(it)
                if res.status is Status.OK and res.answer:
                    entry.answered, entry.answer = True, res.answer
                    entry.answer_probability = float(res.answer_probability)
                else:
                    entry.error = res.error or "no answer"
            entries.append(entry)
        return entries

    @staticmethod
    def tracks_message(cam: Camera, frame: Frame, queries: tuple, results: List[Result], hold_s: float = 0.0) -> Tracks:
        """One Tracks message: an entry per query (found, held while occluded, or not found), with its track id.

        A found query's best object is published with its geometry fused over the track's frames (in the
        result's geometry frame: `target_frame`, or the camera's); a query not found on this frame whose
        track is held (`hold_s`) repeats what was last published for it, `occluded`, with when it was seen."""
        geometry_frame = next((r.geometry_frame_id for r in results if r.geometry_frame_id), frame.frame_id)
        msg = Tracks(header=convert.header_of(frame.stamp_ns, frame.frame_id), camera=cam.name,
                     image_width=frame.width, image_height=frame.height, geometry_frame_id=geometry_frame)
        tracker = cam.standing.tracker
        tracker.hold_s = hold_s
        for query, res in zip(queries, results):
            entry = TrackedQuery(query=query, token_ids=[int(t) for t in res.token_ids])
            if res.status is Status.OK:
                one = convert.result_to_msg(res, masks=False)
                entry.presence, entry.candidates = one.presence, one.candidates
                entry.ambiguous, entry.ambiguity = one.ambiguous, one.ambiguity
            if res.status is Status.OK and res.objects:
                entry.found = True
                index = best_index(res.objects)
                best = res.objects[index]
                entry.track_id = tracker.update(query, best.box_px, frame.stamp_ns)
                track = tracker.track(query)
                if best.geometry is not None and best.geometry.valid:
                    res.objects[index] = replace(best, geometry=track.fusion.add(best.geometry, geometry_frame))
                    one.objects[index] = convert.object_to_msg(res.objects[index])
                entry.objects = one.objects
                entry.last_seen = msg.header.stamp
                track.held = list(entry.objects)
            else:
                entry.track_id = tracker.update(query, None, frame.stamp_ns)
                track = tracker.track(query) if entry.track_id else None
                if track is not None:
                    entry.occluded = True
                    entry.objects = list(track.held or [])
                    entry.last_seen = convert.ns_to_stamp(track.last_seen_ns)
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
