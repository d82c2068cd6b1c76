"""Commands about frames -> results. The one path every interface (CLI, node, benchmark) uses.

prompt (`tasks`) -> ids (`loading.TextCodec`) -> tokens (`decoding` over a backend) ->
entities (`grounding`) -> pixels and 3D (`geometry`). Errors never escape `run`: they become
a result with a status, so every command gets exactly one answer.
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import grounding
from .backends.base import Backend, BackendError
from .backends.registry import AUTO, choose_backend, create_backend
from .config import MAX_CANDIDATES, MAX_NGRAM, Kosmos2Config
from .decoding import Cancelled, DecodingMode, Generation, Row, candidate_search, generate, logits_processors
from .frames import Frame, FrameEncoding
from .geometry import InputGeometry, box_point_3d
from .grounding import GRID, Box, box_iou
from .loading import PromptIds, TextCodec, checkpoint_no_repeat_ngram_size, load_processor, resolve_model
from .object_geometry import GeometryConfig, ObjectGeometry, object_geometry
from .tasks import TASKS, Output, Prompt, PromptError, Task, TaskRequest, TaskSpec, build_prompts, sanitize_text
from .vocab import PATCH_TOKEN_RE


class Status(enum.IntEnum):
    """GroundingResult.STATUS_*, for a core without ROS (test_convert checks they agree)."""
    OK = 0
    BUSY = 1
    NO_FRAME = 2
    STALE_FRAME = 3
    INVALID = 4
    CANCELLED = 5
    MODEL_ERROR = 6
    NOT_ACTIVE = 7


@dataclass
class Command:
    id: str = ""
    task: str = "refer"
    text: str = ""
    region_px: Optional[Box] = None        # pixels of the source image (REGION task)
    image_stamp_ns: int = 0                # 0 = newest frame
    max_new_tokens: int = 0                # 0 = config default
    decoding: str = ""                     # "" = config default
    no_repeat_ngram_size: int = -1         # -1 = config default; 0 = off
    camera: str = ""                       # which camera's frame (the node's `cameras`; "" = the only one)
    max_candidates: int = -1               # -1 = config default; 0 = off
    describe_candidates: int = -1          # -1 = config default; 0 = no, 1 = yes


@dataclass
class GroundedBox:
    phrase: str
    entity_index: int
    span: Tuple[int, int]
    box_px: Box
    box_norm: Box
    score: float
    point: Optional[Tuple[float, float, float]] = None
    geometry: Optional[ObjectGeometry] = None   # mask, refined box, 3D box, grasp, cloud (`object_geometry`)
    description: str = ""                       # the box described in words (describe_candidates)
    point_error: str = ""                       # why there is no point


@dataclass
class Result:
    id: str
    task: str
    status: Status = Status.OK
    error: str = ""
    stamp_ns: int = 0
    frame_id: str = ""
    width: int = 0
    height: int = 0
    text: str = ""
    raw_text: str = ""
    entities: List[grounding.Entity] = field(default_factory=list)
    objects: List[GroundedBox] = field(default_factory=list)
    token_ids: List[int] = field(default_factory=list)
    prompt_ids: List[int] = field(default_factory=list)
    timings_ms: dict = field(default_factory=dict)
    model_calls: int = 0
    no_repeat_ngram_size: int = 0          # the value the command was decoded with
    camera: str = ""
    geometry_frame_id: str = ""            # frame of the objects' geometry (the camera's, or target_frame)
    presence: float = -1.0                 # p(<object>) after the phrase (refer: its one; phrase grounding: the least); -1 n/a
    not_found_reason: str = ""             # why a refer result holds no object
    candidates: List[GroundedBox] = field(default_factory=list)   # other boxes the model considered, best first
    ambiguity: float = 0.0                 # best candidate's score / the chosen box's (0 without candidates)
    ambiguous: bool = False                # ambiguity >= ambiguity_ratio

    @classmethod
    def failure(cls, command: Command, status: Status, error: str, frame: Optional[Frame] = None) -> Result:
        res = cls(id=command.id, task=command.task, status=status, error=error, camera=command.camera)
        if frame is not None:
            res.stamp_ns, res.frame_id, res.width, res.height = frame.stamp_ns, frame.frame_id, frame.width, frame.height
        return res

    def to_json(self) -> dict:
        return {
            "id": self.id, "task": self.task, "status": self.status.name.lower(), "error": self.error,
            "image": {"width": self.width, "height": self.height, "stamp_ns": self.stamp_ns, "frame_id": self.frame_id},
            "text": self.text, "raw_text": self.raw_text,
            "entities": [{"phrase": e.phrase, "span": list(e.span), "boxes_px": [list(b) for b in e.boxes_px],
                          "boxes_norm": [list(b) for b in e.boxes_norm], "scores": list(e.scores)}
                         for e in self.entities],
            "token_ids": list(self.token_ids), "prompt_length": len(self.prompt_ids),
            "model_calls": self.model_calls, "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


@dataclass
class _Plan:
    """A validated command: its task, prompts as ids and how to decode them."""
    command: Command
    spec: TaskSpec
    text: str                  # the command's text, sanitised (what the task's merge reads)
    prompts: List[Prompt]
    ids: List[PromptIds]
    max_new_tokens: int
    mode: DecodingMode
    no_repeat_ngram_size: int
    max_candidates: int = 0
    describe_candidates: bool = False


#: Tokens a candidate's description may take (a short phrase: "a red mug next to the laptop").
DESCRIBE_TOKENS = 24


def described_as(region_text: str) -> str:
    """A region description's text ("It is a red mug next to the laptop.") as a short description of
    the box ("a red mug next to the laptop")."""
    text = region_text.strip()
    for lead in ("It is ", "It "):
        if text.startswith(lead):
            text = text[len(lead):]
            break
    return text.rstrip(". ").strip()


class Pipeline:
    def __init__(self, config: Kosmos2Config, backend: Backend, processor: Any,
                 checkpoint_no_repeat_ngram_size: int = 0, backend_reason: str = "") -> None:
        """`checkpoint_no_repeat_ngram_size`: the checkpoint's own setting, used where the config
        says -1 (`Pipeline.load` reads it from the checkpoint's generation_config.json).
        `backend_reason`: why this backend runs (which `backend: auto` chose and why)."""
        self.config = config
        self.backend = backend
        precision = getattr(backend, "precision", config.precision)
        self.backend_reason = backend_reason or f"backend {backend.name} (configured), {precision}"
        if getattr(backend, "caveat", ""):
            self.backend_reason += f"; {backend.caveat}"
        self.processor = processor
        self.checkpoint_no_repeat_ngram_size = int(checkpoint_no_repeat_ngram_size)
        self.codec = TextCodec(processor)
        self.vocab = self.codec.vocab

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

    # -- frames ----------------------------------------------------------------------------
    def encode(self, frame: Frame) -> FrameEncoding:
        """The frame's image encoding, computed on first use and then reused."""
        return self._encode(frame)[0]

    def _encode(self, frame: Frame) -> Tuple[FrameEncoding, float]:
        """(encoding, ms spent encoding in this call: 0 when it was already cached)."""
        with frame.lock:
            if frame.encoding is not None:
                return frame.encoding, 0.0
            from PIL import Image

            t0 = time.perf_counter()
            pixel_values = self.processor.image_processor(
                images=Image.fromarray(frame.rgb), return_tensors="np")["pixel_values"].astype(np.float32)
            embeds = self.backend.encode_image(pixel_values)
            geometry = InputGeometry.from_processor(self.processor.image_processor, frame.width, frame.height)
            frame.encoding = FrameEncoding(pixel_values, embeds, geometry, (time.perf_counter() - t0) * 1e3)
            return frame.encoding, frame.encoding.encode_ms

    def encode_frames(self, frames: Sequence[Frame]) -> List[float]:
        """Encode every frame not yet encoded, all in one vision-encoder batch; ms each spent now.

        The backend's `encode_images` batches across frames where it can; each frame's encoding
        is what `encode` would give it alone.
        """
        todo = list({id(f): f for f in frames if f.encoding is None}.values())
        spent = {id(f): 0.0 for f in frames}
        if not todo:
            return [0.0 for _ in frames]
        from PIL import Image

        t0 = time.perf_counter()
        pixels = [self.processor.image_processor(images=Image.fromarray(f.rgb), return_tensors="np")["pixel_values"]
                  .astype(np.float32) for f in todo]
        embeds = self.backend.encode_images(pixels)
        each_ms = (time.perf_counter() - t0) * 1e3 / len(todo)
        for frame, pv, emb in zip(todo, pixels, embeds):
            with frame.lock:
                if frame.encoding is None:
                    geometry = InputGeometry.from_processor(self.processor.image_processor, frame.width, frame.height)
                    frame.encoding = FrameEncoding(pv, emb, geometry, each_ms)
                    spent[id(frame)] = each_ms
        return [spent[id(f)] for f in frames]

    def grounding_head(self) -> List[int]:
        """The ids every grounding prompt about a frame starts with: `<s><image>…</image><grounding>`."""
        ids = self.codec.encode(build_prompts(TaskRequest(task=Task.REFER, text="x"))[0].text).input_ids
        return ids[:self._prefix_len(ids)]

    def encode_ahead(self, frames: Sequence[Frame]) -> int:
        """Encode frames (batched) and prefill their grounding head before any command asks.

        A command about such a frame then pays only its own suffix and decode steps, with the
        same tokens (the head's KV is exactly what its own prefill would compute). Returns how
        many frames were prepared now.
        """
        frames = [f for f in frames if f.encoding is None or not f.encoding.prefix_caches]
        if not frames:
            return 0
        self.encode_frames(frames)
        head = self.grounding_head()
        mask = self.codec.encode(build_prompts(TaskRequest(task=Task.REFER, text="x"))[0].text).image_mask[:len(head)]
        self._prefill_heads([(f.encoding, tuple(head), mask) for f in frames])
        return len(frames)

    def _prefill_heads(self, wanted: Sequence[Tuple[FrameEncoding, Tuple[int, ...], List[int]]]) -> None:
        """Prefix caches for (encoding, prefix ids, image mask) not cached yet, prefilled as one batch per prefix."""
        by_key: dict = {}
        for enc, key, mask in wanted:
            if key not in enc.prefix_caches and all(e is not enc for e, _ in by_key.get(key, [])):
                by_key.setdefault(key, []).append((enc, mask))
        for key, group in by_key.items():
            caches = self.backend.prefill_images([enc.image_embeds for enc, _ in group], list(key), group[0][1])
            for (enc, _), cache in zip(group, caches):
                enc.prefix_caches[key] = cache

    def run_frames(self, items: Sequence[Tuple[Frame, Sequence[Command]]],
                   should_stop: Optional[Callable[[], bool]] = None) -> List[List[Result]]:
        """Commands about several frames (e.g. one per camera) served as one batch.

        Frames are encoded in one vision batch, their grounding heads prefilled in one batch,
        and every command's rows (suffix prefill and decode steps) run together; each row's
        tokens are those `run` gives it alone. Results come back in the order given.
        """
        return self._serve(items, lambda plans: self._decode_frames(items, plans, should_stop), None, should_stop)

    def _decode_frames(self, items: Sequence[Tuple[Frame, Sequence[Command]]], plans: List[Tuple[int, int, _Plan]],
                       should_stop: Optional[Callable[[], bool]]) -> Dict[Tuple[int, int], Result]:
        live = sorted({f for f, _, _ in plans})
        t0 = time.perf_counter()
        spent = dict(zip(live, self.encode_frames([items[f][0] for f in live])))
        heads = []
        for f, _, plan in plans:
            for pids in plan.ids:
                plen = self._prefix_len(pids.input_ids)
                if plen:
                    heads.append((items[f][0].encoding, tuple(pids.input_ids[:plen]), pids.image_mask[:plen]))
        self._prefill_heads(heads)
        rows, owners = [], []
        for f, i, plan in plans:
            enc = items[f][0].encoding
            frame_rows, _ = self._rows([(i, plan)], enc)
            for row in frame_rows:
                row.image_embeds = enc.image_embeds
            rows.extend(frame_rows)
            owners.extend([(f, i)] * len(frame_rows))
        t1 = time.perf_counter()
        gens = generate(self.backend, None, rows, self.vocab, should_stop=should_stop)
        gen_ms = (time.perf_counter() - t1) * 1e3
        prep_ms = (t1 - t0) * 1e3 - sum(spent.values())
        out = {}
        for f, i, plan in plans:
            frame = items[f][0]
            mine = [g for g, owner in zip(gens, owners) if owner == (f, i)]
            res = self._result(plan, mine, frame, frame.encoding)
            res.timings_ms = {"encode": spent[f], "prefix": max(prep_ms, 0.0), "generate": gen_ms}
            out[(f, i)] = res
        return out

    def _serve(self, items: Sequence[Tuple[Frame, Sequence[Command]]],
               decode: Callable[[List[Tuple[int, int, _Plan]]], Dict[Tuple[int, int], Result]],
               on_candidates: Optional[Callable[[Result], None]] = None,
               should_stop: Optional[Callable[[], bool]] = None) -> List[List[Result]]:
        """What every batch shares: plan each command (INVALID when it cannot be), `decode` the
        plans ((frame index, command index, plan) -> result), candidates described where asked, a
        cancellation or a backend fault answered for every planned command, and the total time."""
        t_start = time.perf_counter()
        results: List[List[Optional[Result]]] = [[None] * len(cmds) for _, cmds in items]
        plans: List[Tuple[int, int, _Plan]] = []
        for f, (frame, cmds) in enumerate(items):
            for i, cmd in enumerate(cmds):
                try:
                    plans.append((f, i, self.plan(cmd, frame)))
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

    # -- commands --------------------------------------------------------------------------
    def check_command(self, command: Command) -> Optional[str]:
        """What is wrong with a command on its own, before any frame is looked up (None: nothing).

        The node answers such a command INVALID even when its camera has no fresh frame: the
        command, not the camera, is what needs fixing. What depends on the frame (a region outside
        the image) is checked by `plan`.
        """
        try:
            task, *_ = self._settings(command)
            region = (0.0, 0.0, 1.0, 1.0) if command.region_px is not None else None
            if TASKS[task].needs_region and region is None:
                raise PromptError(f"task {task.value!r} needs a region (use_region and region in pixels)")
            build_prompts(TaskRequest(task=task, text=command.text, region_norm=region),
                          sorted(self.vocab.control_strings), self.config.max_prompt_chars)
        except (PromptError, ValueError) as exc:
            return str(exc)
        return None

    def _settings(self, command: Command) -> Tuple[Task, int, DecodingMode, int, int, bool]:
        """A command's task and decoding settings, its own or the config's; PromptError when out of range."""
        task = Task.parse(command.task)
        limit = self.config.max_new_tokens_limit
        max_new = int(command.max_new_tokens or self.config.max_new_tokens)
        if not 1 <= max_new <= limit:
            raise PromptError(f"max_new_tokens {max_new} outside [1, {limit}] (parameter max_new_tokens_limit)")
        mode = DecodingMode.parse(command.decoding or self.config.decoding)
        ngram = self.no_repeat_ngram_size(command)
        wanted = self.config.max_candidates if command.max_candidates < 0 else int(command.max_candidates)
        if not 0 <= wanted <= MAX_CANDIDATES:
            raise PromptError(f"max_candidates {wanted} outside [0, {MAX_CANDIDATES}]")
        describe = self.config.describe_candidates if command.describe_candidates < 0 else bool(command.describe_candidates)
        return task, max_new, mode, ngram, wanted, describe

    def plan(self, command: Command, frame: Frame) -> _Plan:
        """Validate a command against a frame; PromptError says what is wrong."""
        task, max_new, mode, ngram, wanted, describe = self._settings(command)
        spec = TASKS[task]
        region_norm = None
        if spec.needs_region:
            if command.region_px is None:
                raise PromptError(f"task {task.value!r} needs a region (use_region and region in pixels)")
            geometry = InputGeometry.from_processor(self.processor.image_processor, frame.width, frame.height)
            try:
                region_norm = geometry.to_normalized(command.region_px)
            except ValueError as exc:
                raise PromptError(str(exc)) from None
            x0, y0, x1, y1 = command.region_px
            if min(x1, x0) >= frame.width or min(y0, y1) >= frame.height or max(x0, x1) <= 0 or max(y0, y1) <= 0:
                raise PromptError(f"region {tuple(command.region_px)} lies outside the {frame.width}x{frame.height} image")
        request = TaskRequest(task=task, text=command.text, region_norm=region_norm)
        prompts = build_prompts(request, sorted(self.vocab.control_strings), self.config.max_prompt_chars)
        ids = [self.codec.encode(p.text, p.bboxes) for p in prompts]
        text = sanitize_text(command.text, (), self.config.max_prompt_chars)
        return _Plan(command, spec, text, prompts, ids, max_new, mode, ngram, wanted, describe)

    def no_repeat_ngram_size(self, command: Optional[Command] = None) -> int:
        """The n-gram size a command decodes with: its own, else the config's, else the checkpoint's."""
        asked = -1 if command is None else int(command.no_repeat_ngram_size)
        if not -1 <= asked <= MAX_NGRAM:
            raise PromptError(f"no_repeat_ngram_size {asked} outside [-1, {MAX_NGRAM}] (-1 = parameter, 0 = off)")
        for value in (asked, self.config.no_repeat_ngram_size):
            if value >= 0:
                return value
        return self.checkpoint_no_repeat_ngram_size

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

    def _decode_frame(self, frame: Frame, plans: List[Tuple[int, int, _Plan]],
                      on_token: Optional[Callable[[int, Generation], None]],
                      should_stop: Optional[Callable[[], bool]]) -> Dict[Tuple[int, int], Result]:
        t0 = time.perf_counter()
        enc, encode_ms = self._encode(frame)
        rows, owners = self._rows([(i, plan) for _, i, plan in plans], enc)
        t1 = time.perf_counter()
        gens = generate(self.backend, enc.image_embeds, rows, self.vocab, on_token=on_token, should_stop=should_stop)
        self._keep_prefixes(rows, gens, enc)
        gen_ms = (time.perf_counter() - t1) * 1e3
        prep_ms = (t1 - t0) * 1e3 - encode_ms
        out = {}
        for f, i, plan in plans:
            mine = [g for g, owner in zip(gens, owners) if owner == i]
            res = self._result(plan, mine, frame, enc)
            res.timings_ms = {"encode": encode_ms, "prefix": max(prep_ms, 0.0), "generate": gen_ms}
            out[(f, i)] = res
        return out

    # -- internals -------------------------------------------------------------------------
    def _rows(self, plans: List[Tuple[int, _Plan]], enc: FrameEncoding) -> Tuple[List[Row], List[int]]:
        """One decode row per prompt, each on its frame's shared prefix where that saves work.

        The prefix (`<s><image>…</image><grounding>`) is the same for every command about a frame.
        A prefix used by one row only is not prefilled on its own: that row prefills its whole
        prompt and hands back the prefix KV (`export_prefix`) for the frame's later commands.
        """
        keyed = [(i, plan, prompt, pids, self._prefix_len(pids.input_ids))
                 for i, plan in plans for prompt, pids in zip(plan.prompts, plan.ids)]
        uses: dict = {}
        for *_, pids, plen in keyed:
            if plen:
                key = tuple(pids.input_ids[:plen])
                uses[key] = uses.get(key, 0) + 1
        rows, owners = [], []
        for i, plan, prompt, pids, plen in keyed:
            row = Row(pids.input_ids, pids.image_mask, plan.max_new_tokens,
                      constrained=(prompt.expects_box and plan.mode is DecodingMode.CONSTRAINED
                                   and plan.max_new_tokens >= 4),
                      processors=logits_processors(plan.no_repeat_ngram_size),
                      max_candidates=candidate_search(plan.max_candidates) if prompt.expects_box else 0)
            if plen:
                key = tuple(pids.input_ids[:plen])
                cache = enc.prefix_caches.get(key)
                if cache is None and uses[key] == 1 and self.backend.can_truncate:
                    row.prefix_len, row.export_prefix = plen, True
                else:
                    if cache is None:
                        _, cache = self.backend.prefill(enc.image_embeds, pids.input_ids[:plen], pids.image_mask[:plen])
                        enc.prefix_caches[key] = cache
                    row.prefix_cache, row.prefix_len = self.backend.fork(cache), plen
            rows.append(row)
            owners.append(i)
        return rows, owners

    def _prefix_len(self, ids: List[int]) -> int:
        """Length of the shared head `<s><image>…</image><grounding>` (0 when nothing follows it)."""
        try:
            plen = ids.index(self.vocab.grounding) + 1
        except ValueError:
            plen = ids.index(self.vocab.eoi) + 1
        return plen if plen < len(ids) else 0

    @staticmethod
    def _keep_prefixes(rows: List[Row], gens: List[Generation], enc: FrameEncoding) -> None:
        for row, gen in zip(rows, gens):
            if row.export_prefix and gen.prefix_cache is not None:
                enc.prefix_caches[tuple(row.input_ids[:row.prefix_len])] = gen.prefix_cache
                gen.prefix_cache = None

    def _result(self, plan: _Plan, gens: List[Generation], frame: Frame, enc: FrameEncoding) -> Result:
        cmd = plan.command
        res = Result(id=cmd.id, task=plan.spec.task.value, stamp_ns=frame.stamp_ns, frame_id=frame.frame_id,
                     width=frame.width, height=frame.height, no_repeat_ngram_size=plan.no_repeat_ngram_size,
                     camera=cmd.camera)
        outputs = []
        for pids, gen in zip(plan.ids, gens):
            full = pids.input_ids + gen.token_ids
            raw = self.codec.decode(full)
            parsed = grounding.parse_generation(raw, self.vocab.patches_per_side)
            grounding.attach_scores(parsed, self._patch_probs(pids.input_ids, gen, raw))
            outputs.append(Output(raw, parsed, self.codec.decode(pids.input_ids)))
            res.token_ids.extend(gen.token_ids)
            res.prompt_ids.extend(pids.input_ids)
            res.model_calls += gen.model_calls
        merged = plan.spec.merge(plan.text, outputs)
        res.text, res.raw_text, res.entities = merged.text, merged.raw_text, merged.entities
        self._place(res, frame, enc.geometry, plan.command.region_px if plan.spec.needs_region else None)
        presences = [g.presence for p, g in zip(plan.prompts, gens) if p.expects_box and g.presence is not None]
        if presences:
            res.presence = float(min(presences))
        self._candidates(res, plan, gens, frame, enc.geometry)
        self._not_found(res, plan)
        return res

    def _candidates(self, res: Result, plan: _Plan, gens: List[Generation], frame: Frame,
                    geometry: InputGeometry) -> None:
        """Other boxes the model considered, as objects (pixels, 3D, geometry), duplicates of a kept box
        (IoU >= 0.5) dropped, best first; and how close the best came to the chosen box."""
        lo = self.vocab.patch_ids()[0]
        grid = self.vocab.patches_per_side
        kept = [o.box_norm for o in res.objects]
        found: List[Tuple[float, GroundedBox]] = []
        for index, (prompt, gen) in enumerate(zip(plan.prompts, gens)):
            phrase = res.entities[index].phrase if index < len(res.entities) and prompt.expects_box else plan.text
            for cand in gen.candidates:
                box_norm = grounding.patch_index_to_box(cand.first - lo, cand.second - lo, grid)
                if any(box_iou(box_norm, k) >= 0.5 for k in kept):
                    continue
                kept.append(box_norm)
                found.append((cand.score, self._grounded(phrase, index, (0, 0), geometry.to_pixels(box_norm),
                                                         box_norm, cand.score, frame, geometry)))
        found.sort(key=lambda f: -f[0])
        res.candidates = [box for _, box in found[:plan.max_candidates]]
        chosen = max((o.score for o in res.objects if o.score == o.score), default=0.0)
        if res.candidates and chosen > 0:
            res.ambiguity = float(res.candidates[0].score / chosen)
        res.ambiguous = bool(res.candidates) and res.ambiguity >= self.config.ambiguity_ratio

    def _describe(self, items: Sequence[Tuple[Frame, Sequence[Command]]], plans: List[Tuple[int, int, _Plan]],
                  results: List[List[Optional[Result]]], on_candidates: Optional[Callable[[Result], None]],
                  should_stop: Optional[Callable[[], bool]]) -> None:
        """Each box of an ambiguous result (the chosen one and its candidates) described in words, all
        of a frame's boxes as one batch of region descriptions on the frame's encoding; so a person can
        be asked which one. A description that cannot be made leaves the text empty, never the result."""
        for f, i, _ in plans:
            res = results[f][i]
            if res is not None and res.candidates and on_candidates is not None:
                on_candidates(res)
        for f, (frame, _) in enumerate(items):
            boxes: List[GroundedBox] = []
            for ff, i, plan in plans:
                res = results[ff][i]
                if ff == f and res is not None and res.status is Status.OK and plan.describe_candidates and res.ambiguous:
                    boxes += res.objects[:1] + res.candidates
            if not boxes:
                continue
            tokens = min(DESCRIBE_TOKENS, self.config.max_new_tokens_limit)   # within what the node allows
            try:
                asks = [(0, k, self.plan(Command(id=f"describe-{k}", task="region", region_px=tuple(b.box_px),
                                                 max_new_tokens=tokens, decoding="free", max_candidates=0,
                                                 describe_candidates=0), frame)) for k, b in enumerate(boxes)]
                described = self._decode_frame(frame, asks, None, should_stop)
            except (PromptError, ValueError, BackendError, Cancelled, RuntimeError, MemoryError):
                continue
            for k, box in enumerate(boxes):
                box.description = described_as(described[(0, k)].text)

    def _not_found(self, res: Result, plan: _Plan) -> None:
        """A refer result with no object says why (presence below its threshold, or every box below score_threshold)."""
        if plan.spec.task is not Task.REFER:
            return
        cfg = self.config
        if 0 <= res.presence < cfg.presence_threshold:
            res.not_found_reason = f"presence {res.presence:.2f} < presence_threshold {cfg.presence_threshold:g}"
            res.objects, res.candidates, res.ambiguous, res.ambiguity = [], [], False, 0.0
        elif not res.objects and any(e.boxes_norm for e in res.entities):
            res.not_found_reason = f"every box scored below score_threshold {cfg.score_threshold:g}"
        elif not res.objects:
            res.not_found_reason = "the model placed no box"

    def _patch_probs(self, prompt_ids: List[int], gen: Generation, raw: str) -> List[Optional[float]]:
        """Probability of each location token in the parsed text, in order (None: from the prompt)."""
        eoi_at = max((i for i, t in enumerate(prompt_ids) if t == self.vocab.eoi), default=-1)
        probs: List[Optional[float]] = [None for t in prompt_ids[eoi_at + 1:] if self.vocab.is_patch(t)]
        probs += [p for t, p in zip(gen.token_ids, gen.probs) if self.vocab.is_patch(t)]
        in_text = len(PATCH_TOKEN_RE.findall(raw.split(grounding.EOI)[-1]))
        return probs if in_text == len(probs) else []

    def _place(self, res: Result, frame: Frame, geometry: InputGeometry, region_px: Optional[Box] = None) -> None:
        """Boxes to pixels, threshold, 3D points and geometry; flatten into objects.

        `region_px`: the region a region command gave. Its object's box is that region (clipped to the
        image), not the cells the model was shown (which `box_normalized` still reports).
        """
        cfg = self.config
        for index, ent in enumerate(res.entities):
            ent.boxes_px = [geometry.to_pixels(b) for b in ent.boxes_norm]
            if region_px is not None and index == 0 and ent.boxes_px:
                x0, y0, x1, y1 = region_px
                ent.boxes_px[0] = (min(max(x0, 0.0), frame.width), min(max(y0, 0.0), frame.height),
                                   min(max(x1, 0.0), frame.width), min(max(y1, 0.0), frame.height))
            if len(ent.scores) != len(ent.boxes_norm):
                ent.scores = [float("nan")] * len(ent.boxes_norm)
            for box_norm, box_px, score in zip(ent.boxes_norm, ent.boxes_px, ent.scores):
                if not math.isnan(score) and score < cfg.score_threshold:
                    continue
                res.objects.append(self._grounded(ent.phrase, index, ent.span, box_px, box_norm, score, frame,
                                                  geometry))
        res.geometry_frame_id = frame.frame_id

    def _grounded(self, phrase: str, index: int, span: Tuple[int, int], box_px: Box, box_norm: Box, score: float,
                  frame: Frame, geometry: InputGeometry) -> GroundedBox:
        """One object of a result (chosen box or candidate): its 3D point and geometry where depth allows."""
        cfg = self.config
        no_depth = self._no_depth_reason(frame)
        point, why = None, no_depth
        if not no_depth:
            try:
                point, why = box_point_3d(box_px, frame.depth_m, frame.intrinsics, cfg.depth_inner_fraction,
                                          cfg.min_depth_m, cfg.max_depth_m, (frame.width, frame.height))
            except Exception as exc:  # noqa: BLE001 - a point that cannot be made must not fail the result
                point, why = None, f"3D point failed: {type(exc).__name__}: {exc}"
        return GroundedBox(phrase, index, span, box_px, tuple(box_norm), score, point,
                           self._object_geometry(box_px, frame, geometry, no_depth), point_error=why)

    def _no_depth_reason(self, frame: Frame) -> str:
        """Why no object of this frame can have a 3D point or geometry ("" when it can)."""
        if not self.config.enable_3d:
            return "3D is off (enable_3d: false)"
        if frame.depth_m is None:
            return "no depth image paired with this frame"
        if frame.intrinsics is None:
            return "no camera_info for this camera"
        return ""

    def _object_geometry(self, box_px: Box, frame: Frame, geometry: InputGeometry, no_depth: str) -> ObjectGeometry:
        """The object's manipulation geometry, or why there is none (`no_depth`: the frame's
        `_no_depth_reason`); never an error for the result."""
        cfg = self.config
        if cfg.enable_3d and not cfg.object_geometry:
            return ObjectGeometry.invalid("object geometry is off (object_geometry: false)")
        if no_depth:
            return ObjectGeometry.invalid(no_depth)
        cell = (geometry.win_w / GRID, geometry.win_h / GRID)
        try:
            return object_geometry(box_px, frame.rgb, frame.depth_m, frame.intrinsics, cell,
                                   GeometryConfig(min_depth_m=cfg.min_depth_m, max_depth_m=cfg.max_depth_m))
        except Exception as exc:  # noqa: BLE001 - a geometry failure must never lose or fail the result
            return ObjectGeometry.invalid(f"geometry failed: {type(exc).__name__}: {exc}")
