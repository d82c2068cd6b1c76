"""Commands about frames -> results: the one path every interface (CLI, node, benchmark) uses.

A command passes six stages, each a module that knows only what it needs, none calling back into
an earlier one:

1. `plan`      command + frame -> prompts as ids and decoding settings, or why not (INVALID);
2. `decode`    plans + the frame's encoding -> generations (the only stage that runs the model;
               rows of several commands and frames batched);
3. `interpret` generations -> text, entities and objects in normalised boxes, presence,
               candidates, ambiguity, "not found" (model outputs only);
4. `place`     normalised boxes -> source pixels (a region command keeps its region);
5. `lift`      pixels + depth + camera_info -> 3D points and geometry, for what was kept;
6. `describe`  optional: an ambiguous result's boxes described in words (a second pass of 1-5).

`Pipeline` is their orchestration and the place where errors become statuses: every command
gets exactly one result.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..backends.base import Backend, BackendError
from ..backends.registry import AUTO, choose_backend, create_backend
from ..model.decoding import Cancelled, Generation
from ..model.loading import TextCodec, checkpoint_no_repeat_ngram_size, load_processor, resolve_model
from ..model.tasks import PromptError
from .config import Kosmos2Config
from .decode import Decoded, Decoder, Key
from .describe import DESCRIBE_TOKENS, boxes_to_describe, described_as, region_commands
from .frames import Frame, FrameEncoding
from .interpret import Interpreter
from .lift import Lifter
from .place import place
from .plan import Plan, Planner
from .results import Command, GroundedBox, Result, Status

__all__ = ["DESCRIBE_TOKENS", "Command", "GroundedBox", "Pipeline", "Plan", "Result", "Status", "described_as"]

#: (frame index, command index, plan) of every command a batch serves.
Planned = List[Tuple[int, int, Plan]]


class Pipeline:
    def __init__(self, config: Kosmos2Config, backend: Backend, processor: Any,
                 checkpoint_no_repeat_ngram_size: int = 0, backend_reason: str = "") -> None:
        """`checkpoint_no_repeat_ngram_size`: the checkpoint's own setting, used where the config
        says -1 (`Pipeline.load` reads it from the checkpoint's generation_config.json).
        `backend_reason`: why this backend runs (which `backend: auto` chose and why)."""
        precision = getattr(backend, "precision", config.precision)
        self.backend_reason = backend_reason or f"backend {backend.name} (configured), {precision}"
        if getattr(backend, "caveat", ""):
            self.backend_reason += f"; {backend.caveat}"
        self.processor = processor
        self.codec = TextCodec(processor)
        self.vocab = self.codec.vocab
        self.planner = Planner(config, processor, self.codec, checkpoint_no_repeat_ngram_size)
        self.decoder = Decoder(backend, processor, self.codec)
        self.interpreter = Interpreter(config, self.codec)
        self.lifter = Lifter(config)
        self.config = config

    @property
    def config(self) -> Kosmos2Config:
        """The settings every stage reads; a new config (the node's runtime parameter changes) reaches them all."""
        return self._config

    @config.setter
    def config(self, config: Kosmos2Config) -> None:
        self._config = config
        for stage in (self.planner, self.interpreter, self.lifter):
            stage.config = config

    @property
    def backend(self) -> Backend:
        """The loaded model (the decode stage runs it)."""
        return self.decoder.backend

    @backend.setter
    def backend(self, backend: Backend) -> None:
        self.decoder.backend = backend

    @classmethod
    def load(cls, config: Kosmos2Config, **backend_options: Any) -> Pipeline:
        """Resolve the model (hub id or directory), load processor and backend."""
        model_dir = resolve_model(config.model, allow_download=config.allow_download,
                                  allow_pickle=config.allow_pickle_weights)
        processor = load_processor(model_dir)
        options = dict(device=config.device, precision=config.precision,
                       allow_pickle=config.allow_pickle_weights, artifacts_dir=config.artifacts_dir,
                       build_engines=config.build_engines, cuda_graph=config.cuda_graph, torch_mode=config.torch_mode,
                       arena_budget_mb=config.arena_budget_mb)
        options.update(backend_options)
        name, reason = config.backend, ""
        if name == AUTO:
            name, options, reason = choose_backend(model_dir, options)
        backend = create_backend(name, model_dir, **options)
        return cls(config, backend, processor, checkpoint_no_repeat_ngram_size(model_dir), reason)

    def close(self) -> None:
        self.backend.close()

    # -- frames (the decode stage's encodings) ------------------------------------------------
    def encode(self, frame: Frame) -> FrameEncoding:
        """The frame's image encoding, computed on first use and then reused."""
        return self.decoder.encode(frame)[0]

    def encode_frames(self, frames: Sequence[Frame]) -> List[float]:
        """Encode every frame not yet encoded, in one vision batch; ms each spent now."""
        return self.decoder.encode_frames(frames)

    def encode_ahead(self, frames: Sequence[Frame]) -> int:
        """Encode frames and prefill their grounding head before any command asks (`Decoder.encode_ahead`)."""
        return self.decoder.encode_ahead(frames)

    def grounding_head(self) -> List[int]:
        """The ids every grounding prompt about a frame starts with: `<s><image>…</image><grounding>`."""
        return self.decoder.grounding_head()

    # -- commands (the plan stage) ---------------------------------------------------------------
    def check_command(self, command: Command) -> Optional[str]:
        """What is wrong with a command on its own, before any frame is looked up (None: nothing)."""
        return self.planner.check_command(command)

    def plan(self, command: Command, frame: Frame) -> Plan:
        """Validate a command against a frame; PromptError says what is wrong."""
        return self.planner.plan(command, frame)

    def no_repeat_ngram_size(self, command: Optional[Command] = None) -> int:
        """The n-gram size a command decodes with: its own, else the config's, else the checkpoint's."""
        return self.planner.no_repeat_ngram_size(command)

    @property
    def checkpoint_no_repeat_ngram_size(self) -> int:
        return self.planner.checkpoint_no_repeat_ngram_size

    # -- serving ---------------------------------------------------------------------------------
    def run(self, command: Command, frame: Frame,
            on_token: Optional[Callable[[int, Generation], None]] = None,
            should_stop: Optional[Callable[[], bool]] = None,
            on_candidates: Optional[Callable[[Result], None]] = None) -> Result:
        """`on_candidates`: called with the result as soon as its candidates are known (before any
        descriptions), for a result that has candidates."""
        return self.run_batch([command], frame, on_token=on_token, should_stop=should_stop,
                              on_candidates=on_candidates)[0]

    def run_batch(self, commands: Sequence[Command], frame: Frame,
                  on_token: Optional[Callable[[int, Generation], None]] = None,
                  should_stop: Optional[Callable[[], bool]] = None,
                  on_candidates: Optional[Callable[[Result], None]] = None) -> List[Result]:
        """Several commands about one frame: encoded once, prompt prefixes shared, rows decoded together."""
        return self._serve([(frame, commands)],
                           lambda plans: self._decode_frame(frame, plans, on_token, should_stop),
                           on_candidates, should_stop)[0]

    def run_frames(self, items: Sequence[Tuple[Frame, Sequence[Command]]],
                   should_stop: Optional[Callable[[], bool]] = None) -> List[List[Result]]:
        """Commands about several frames (e.g. one per camera) served as one batch.

        Frames are encoded in one vision batch, their grounding heads prefilled in one batch,
        and every command's rows (suffix prefill and decode steps) run together; each row's
        tokens are those `run` gives it alone. Results come back in the order given.
        """
        def decode(plans: Planned) -> Dict[Key, Result]:
            return self._results(self.decoder.decode_frames(items, plans, should_stop))

        return self._serve(items, decode, None, should_stop)

    def _decode_frame(self, frame: Frame, plans: Planned, on_token: Optional[Callable[[int, Generation], None]],
                      should_stop: Optional[Callable[[], bool]]) -> Dict[Key, Result]:
        """Stages 2-5 for commands about one frame."""
        return self._results(self.decoder.decode_frame(frame, plans, on_token, should_stop))

    def _results(self, decoded: Dict[Key, Decoded]) -> Dict[Key, Result]:
        """Stages 3-5: each command's generations interpreted, placed and lifted."""
        out = {}
        for key, d in decoded.items():
            res = self.interpreter.interpret(d.plan, d.gens, d.frame)
            place(res, d.encoding.geometry, d.frame.width, d.frame.height,
                  d.plan.command.region_px if (d.plan.spec.needs_region or d.plan.spec.accepts_region) else None)
            self.lifter.lift(res, d.frame, d.encoding.geometry)
            res.timings_ms = dict(d.timings_ms)
            out[key] = res
        return out

    def _serve(self, items: Sequence[Tuple[Frame, Sequence[Command]]],
               decode: Callable[[Planned], Dict[Key, Result]],
               on_candidates: Optional[Callable[[Result], None]] = None,
               should_stop: Optional[Callable[[], bool]] = None) -> List[List[Result]]:
        """What every batch shares: plan each command (INVALID when it cannot be), `decode` the plans,
        candidates described where asked, a cancellation or a backend fault answered for every planned
        command, and the total time."""
        t_start = time.perf_counter()
        results: List[List[Optional[Result]]] = [[None] * len(cmds) for _, cmds in items]
        plans: Planned = []
        for f, (frame, cmds) in enumerate(items):
            for i, cmd in enumerate(cmds):
                try:
                    plans.append((f, i, self.planner.plan(cmd, frame)))
                except (PromptError, ValueError) as exc:
                    results[f][i] = Result.failure(cmd, Status.INVALID, str(exc), frame)
        if plans:
            try:
                for (f, i), res in decode(plans).items():
                    results[f][i] = res
                self._describe(items, plans, results, on_candidates, should_stop)
            except Cancelled:
                for f, i, plan in plans:
                    results[f][i] = Result.failure(plan.command, Status.CANCELLED, "cancelled", items[f][0])
            except (BackendError, RuntimeError, MemoryError) as exc:
                for f, i, plan in plans:
                    results[f][i] = Result.failure(plan.command, Status.MODEL_ERROR,
                                                   f"{type(exc).__name__}: {exc}", items[f][0])
        total = (time.perf_counter() - t_start) * 1e3
        for row_results in results:
            for res in row_results:
                assert res is not None
                res.timings_ms["total"] = total
        return results  # type: ignore[return-value]

    def _describe(self, items: Sequence[Tuple[Frame, Sequence[Command]]], plans: Planned,
                  results: List[List[Optional[Result]]], on_candidates: Optional[Callable[[Result], None]],
                  should_stop: Optional[Callable[[], bool]]) -> None:
        """Stage 6: candidates reported as soon as they are known, then each frame's boxes to describe as
        one batch of region commands through stages 1-5; a description that cannot be made stays empty."""
        for f, i, _ in plans:
            res = results[f][i]
            if res is not None and res.candidates and on_candidates is not None:
                on_candidates(res)
        for f, (frame, _) in enumerate(items):
            mine = [(plan, results[ff][i]) for ff, i, plan in plans if ff == f]
            boxes = boxes_to_describe([p for p, _ in mine], [r for _, r in mine])
            if not boxes:
                continue
            try:
                asks = [(0, k, self.planner.plan(cmd, frame))
                        for k, cmd in enumerate(region_commands(boxes, self.config.max_new_tokens_limit))]
                described = self._decode_frame(frame, asks, None, should_stop)
            except (PromptError, ValueError, BackendError, Cancelled, RuntimeError, MemoryError):
                continue
            for k, box in enumerate(boxes):
                box.description = described_as(described[(0, k)].text)
