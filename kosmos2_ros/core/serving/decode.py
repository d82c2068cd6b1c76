"""Stage 2, decode: plans and their frames -> generations (tokens, probabilities, presence, candidate cells).

The only stage that runs the model. A frame is encoded once (cached on the frame); every grounding
prompt about it starts with the same head `<s><image>…</image><grounding>`, whose KV is prefilled
once and shared; rows of several commands, and of several frames, are decoded as one batch
(`decoding.generate`), each row's tokens those it would get alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..backends.base import Backend
from ..model.decoding import DecodingMode, Generation, Row, candidate_search, generate, logits_processors
from ..model.loading import TextCodec
from ..model.tasks import Task, TaskRequest, build_prompts
from ..spatial.geometry import InputGeometry
from .frames import Frame, FrameEncoding
from .plan import Plan

#: (frame index, command index) -> a command's place in a batch.
Key = Tuple[int, int]


@dataclass
class Decoded:
    """One command's generations (one per prompt) and the frame encoding they were decoded on."""
    plan: Plan
    gens: List[Generation]
    frame: Frame
    encoding: FrameEncoding
    timings_ms: Dict[str, float] = field(default_factory=dict)   # encode, prefix, generate


class Decoder:
    """Frames -> encodings, plans -> generations, over one backend."""

    def __init__(self, backend: Backend, processor: Any, codec: TextCodec) -> None:
        self.backend, self.processor, self.codec = backend, processor, codec
        self.vocab = codec.vocab

    # -- frames ----------------------------------------------------------------------------
    def encode(self, frame: Frame) -> Tuple[FrameEncoding, float]:
        """(the frame's encoding, ms spent encoding in this call: 0 when it was already cached)."""
        with frame.lock:
            if frame.encoding is not None:
                return frame.encoding, 0.0
            t0 = time.perf_counter()
            pixel_values = self._pixels(frame)
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
        t0 = time.perf_counter()
        pixels = [self._pixels(f) for f in todo]
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
        return ids[:self.prefix_len(ids)]

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

    # -- commands ------------------------------------------------------------------------------
    def decode_frame(self, frame: Frame, plans: List[Tuple[int, int, Plan]],
                     on_token: Optional[Callable[[int, Generation], None]] = None,
                     should_stop: Optional[Callable[[], bool]] = None) -> Dict[Key, Decoded]:
        """Commands about one frame: encoded once, prompt heads shared, rows decoded together."""
        t0 = time.perf_counter()
        enc, encode_ms = self.encode(frame)
        rows, owners = self._rows([(i, plan) for _, i, plan in plans], enc)
        t1 = time.perf_counter()
        gens = generate(self.backend, enc.image_embeds, rows, self.vocab, on_token=on_token, should_stop=should_stop)
        self._keep_prefixes(rows, gens, enc)
        timings = {"encode": encode_ms, "prefix": max((t1 - t0) * 1e3 - encode_ms, 0.0),
                   "generate": (time.perf_counter() - t1) * 1e3}
        return {(f, i): Decoded(plan, [g for g, owner in zip(gens, owners) if owner == i], frame, enc, dict(timings))
                for f, i, plan in plans}

    def decode_frames(self, items: Sequence[Tuple[Frame, Sequence[Any]]], plans: List[Tuple[int, int, Plan]],
                      should_stop: Optional[Callable[[], bool]] = None) -> Dict[Key, Decoded]:
        """Commands about several frames (one per camera) as one batch: frames encoded in one vision batch,
        their heads prefilled in one batch, every command's rows decoded together."""
        live = sorted({f for f, _, _ in plans})
        t0 = time.perf_counter()
        spent = dict(zip(live, self.encode_frames([items[f][0] for f in live])))
        heads = []
        for f, _, plan in plans:
            for pids in plan.ids:
                plen = self.prefix_len(pids.input_ids)
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
        prep_ms = max((t1 - t0) * 1e3 - sum(spent.values()), 0.0)
        out = {}
        for f, i, plan in plans:
            frame = items[f][0]
            mine = [g for g, owner in zip(gens, owners) if owner == (f, i)]
            out[(f, i)] = Decoded(plan, mine, frame, frame.encoding,
                                  {"encode": spent[f], "prefix": prep_ms, "generate": gen_ms})
        return out

    # -- internals -------------------------------------------------------------------------
    def _pixels(self, frame: Frame) -> np.ndarray:
        """The image processor's (1, 3, 224, 224) float32 pixels of the frame."""
        from PIL import Image

        pv = self.processor.image_processor(images=Image.fromarray(frame.rgb), return_tensors="np")["pixel_values"]
        return pv.astype(np.float32)

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

    def _rows(self, plans: List[Tuple[int, Plan]], enc: FrameEncoding) -> Tuple[List[Row], List[int]]:
        """One decode row per prompt, each on its frame's shared prefix where that saves work.

        The prefix (`<s><image>…</image><grounding>`) is the same for every command about a frame.
        A prefix used by one row only is not prefilled on its own: that row prefills its whole
        prompt and hands back the prefix KV (`export_prefix`) for the frame's later commands.
        """
        keyed = [(i, plan, prompt, pids, self.prefix_len(pids.input_ids))
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
                      max_candidates=candidate_search(plan.max_candidates) if prompt.expects_box else 0,
                      yes_no=plan.spec.yes_no)
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

    def prefix_len(self, ids: List[int]) -> int:
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
