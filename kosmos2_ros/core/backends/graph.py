"""What the two exported-graph backends (onnxruntime, TensorRT) share.

Both run the same decoder graph (`onnx.export`) over caches kept by `kv_cache`: prefill packs
rows into one batch and appends their new keys/values (`_append`), a decode step runs on a
static arena (`decode_batch`). Everything above those two calls is the same and lives here.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .base import Backend, BackendError
from .kv_cache import ArrayOps, KVCache, standalone, truncated


class GraphBackend(Backend):
    """A backend over the exported decoder graph; subclasses provide `_append` and `decode_batch`."""

    can_truncate = True
    #: What a non-finite logit most likely means on this backend (the error's text).
    nonfinite_error = "the model produced non-finite logits"
    _ops: ArrayOps

    def prefill(self, image_embeds: Any, input_ids: Sequence[int], image_mask: Sequence[int],
                cache: Optional[KVCache] = None) -> Tuple[np.ndarray, KVCache]:
        if cache is not None or image_embeds is None:
            image_embeds, image_mask = None, [0] * len(input_ids)   # as transformers: no image after a past
        logits, caches = self._append([cache], [list(input_ids)], image_embeds, [list(image_mask)])
        return logits[0], caches[0]

    def prefill_batch(self, caches: List[Optional[KVCache]], chunks: List[List[int]]) -> Tuple[np.ndarray, List[KVCache]]:
        """Text chunks (no image) appended to several caches in one call."""
        return self._append(list(caches), [list(c) for c in chunks], None, [[0] * len(c) for c in chunks])

    def decode(self, cache: KVCache, token_id: int) -> Tuple[np.ndarray, KVCache]:
        logits, caches = self.decode_batch([cache], [int(token_id)])
        return logits[0], caches[0]

    def truncate(self, cache: KVCache, length: int) -> KVCache:
        return truncated(cache, length, self._ops)

    def fork(self, cache: KVCache) -> KVCache:
        return standalone(cache, self._ops)   # standalone arrays are never written in place

    def _check(self, logits: np.ndarray) -> None:
        if not np.isfinite(logits).all():
            raise BackendError(self.nonfinite_error)

    def _append(self, caches: List[Optional[KVCache]], chunks: List[List[int]], image_embeds: Any,
                masks: List[List[int]]) -> Tuple[np.ndarray, List[KVCache]]:
        """Append chunk b to cache b for every row at once -> (rows of last logits, standalone caches).

        Row layout in the batch: [its past | hole up to the longest past | left padding | chunk]
        (`kv_cache.pack_appends`); holes and padding have attention_mask 0 and the pad position.
        """
        raise NotImplementedError
