"""What a backend must do: encode an image, prefill a prompt, decode one token.

The greedy loop (`core.decoding`) is shared by every backend, so faithfulness to
transformers' `generate` is decided in one place; a backend only has to compute the same
logits. Caches are opaque to the loop. Logits come back as host arrays or, where they were
computed on a GPU, as `logits.DeviceLogits`, which the loop reads on the device.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .errors import BackendError, BackendUnavailable
from .logits import stack_rows

__all__ = ["Backend", "BackendError", "BackendUnavailable", "PackedRows", "cuda_capability", "cuda_device_count",
           "pack_rows", "position_ids"]


def cuda_device_count() -> int:
    """GPUs torch can use here (0 without torch or a CUDA build): `auto`'s one probe of the machine."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def cuda_capability(device: str = "cuda") -> Tuple[int, int]:
    """(major, minor) compute capability of a CUDA device ("cuda" or "cuda:N")."""
    import torch

    index = torch.device(device).index or 0
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def position_ids(input_ids: Sequence[int], cache_length: int, pad_id: int) -> np.ndarray:
    """Kosmos-2's positions for a chunk of tokens appended to a cache of `cache_length` tokens.

    As the text model computes them from `input_ids`: padding tokens sit at `pad_id`, the
    others count from `pad_id + 1`. Backends whose graphs take explicit positions use this.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = (ids != pad_id).astype(np.int64)
    return (np.cumsum(mask) + cache_length) * mask + pad_id


@dataclass
class PackedRows:
    """Several chunks, each appended to its own cache, laid out as one batch for the exported graph.

    Row b: [its past | hole up to the longest past | left padding | chunk]. Holes and padding have
    attention_mask 0 and the pad position, so each row computes exactly what it would alone.
    """
    input_ids: np.ndarray       # [b, smax]
    position_ids: np.ndarray    # [b, smax]
    image_mask: np.ndarray      # [b, smax]
    attention_mask: np.ndarray  # [b, pmax + smax]
    pasts: List[int]
    lens: List[int]
    pmax: int
    smax: int


def pack_rows(pasts: Sequence[int], chunks: Sequence[Sequence[int]], masks: Sequence[Sequence[int]],
              pad_id: int) -> PackedRows:
    """The graph inputs for `chunks[b]` appended to a cache of `pasts[b]` tokens (ONNX and TensorRT)."""
    bsz = len(chunks)
    lens = [len(c) for c in chunks]
    pmax, smax = max(pasts), max(lens)
    ids = np.full((bsz, smax), pad_id, dtype=np.int64)
    pos = np.full((bsz, smax), pad_id, dtype=np.int64)
    img = np.zeros((bsz, smax), dtype=np.int64)
    att = np.zeros((bsz, pmax + smax), dtype=np.int64)
    for b, (chunk, past, n) in enumerate(zip(chunks, pasts, lens)):
        ids[b, smax - n:] = chunk
        pos[b, smax - n:] = position_ids(chunk, past, pad_id)
        img[b, smax - n:] = masks[b]
        att[b, :past] = 1
        att[b, pmax + smax - n:] = 1
    return PackedRows(ids, pos, img, att, list(pasts), lens, pmax, smax)


class Backend(abc.ABC):
    """One loaded model on one device."""

    name: str = "base"
    #: the text model's hidden size and vocabulary (for buffers and checks)
    vocab_size: int
    pad_token_id: int
    #: whether `truncate` works (lets a lone command skip the separate prefix prefill)
    can_truncate: bool = False
    #: one line the user should read with this backend's results ("" when none), e.g. that
    #: quantized weights of a checkpoint this small say nothing of the real model's error
    caveat: str = ""

    @abc.abstractmethod
    def encode_image(self, pixel_values: np.ndarray) -> Any:
        """(1, 3, H, W) float32 pixels -> the 64 projected image embeddings, backend-native."""

    #: whether `encode_image` takes several frames in one (N, 3, H, W) call
    encodes_batches: bool = False

    def encode_images(self, pixel_values: Sequence[np.ndarray]) -> List[Any]:
        """Several frames' (1, 3, H, W) pixels -> their image embeddings (frames of several cameras).

        One `encode_image` call on the stacked frames where the backend `encodes_batches`,
        else one call per frame.
        """
        if len(pixel_values) < 2 or not self.encodes_batches:
            return [self.encode_image(pv) for pv in pixel_values]
        batch = self.encode_image(np.concatenate([np.asarray(pv, dtype=np.float32) for pv in pixel_values]))
        return [batch[b:b + 1] for b in range(batch.shape[0])]

    def prefill_images(self, image_embeds: Sequence[Any], input_ids: Sequence[int],
                       image_mask: Sequence[int]) -> List[Any]:
        """The same prompt head on several frames' images -> a cache for each (logits not needed).

        Backends that can batch the prefill override this; the default runs them in turn.
        """
        return [self.prefill(emb, input_ids, image_mask)[1] for emb in image_embeds]

    @abc.abstractmethod
    def prefill(self, image_embeds: Any, input_ids: Sequence[int], image_mask: Sequence[int],
                cache: Any = None) -> Tuple[np.ndarray, Any]:
        """Run `input_ids` (appended to `cache`, or from scratch) -> (last-position logits, cache).

        `image_mask[i] == 1` marks positions whose embedding is the next image embedding.
        The given cache is not modified; the returned one holds the appended tokens.
        """

    @abc.abstractmethod
    def decode(self, cache: Any, token_id: int) -> Tuple[np.ndarray, Any]:
        """One token on top of `cache` -> (logits, cache holding it). May update in place."""

    def decode_batch(self, caches: List[Any], token_ids: List[int]) -> Tuple[np.ndarray, List[Any]]:
        """One token for each of several sequences -> (rows of logits, caches).

        Backends that can run rows together override this; the default runs them in turn.
        """
        rows, out = [], []
        for cache, tok in zip(caches, token_ids):
            logits, new_cache = self.decode(cache, tok)
            rows.append(logits)
            out.append(new_cache)
        return stack_rows(rows), out

    def prefill_batch(self, caches: List[Any], chunks: List[List[int]]) -> Tuple[np.ndarray, List[Any]]:
        """Text chunks (no image) appended to several caches -> (rows of last logits, new caches).

        Used for the per-expression suffixes after a frame's shared prefix. The given caches
        are not modified. Backends that can run rows together override this.
        """
        rows, out = [], []
        for cache, chunk in zip(caches, chunks):
            logits, new_cache = self.prefill(None, chunk, [0] * len(chunk), cache=cache)
            rows.append(logits)
            out.append(new_cache)
        return stack_rows(rows), out

    def truncate(self, cache: Any, length: int) -> Any:
        """A new cache holding only the first `length` tokens of `cache`, or None if unsupported.

        Exact for a causal decoder: the first tokens' keys and values do not depend on later ones.
        """
        return None

    @abc.abstractmethod
    def fork(self, cache: Any) -> Any:
        """An independent copy of a cache (to extend one shared prefix several ways)."""

    def cache_length(self, cache: Any) -> int:
        return int(cache.length)

    def counters(self) -> Dict[str, Any]:
        """What the backend has done that diagnostics show (decode steps captured and replayed, arenas kept)."""
        return {}

    def close(self) -> None:
        """Free device memory. The backend is unusable afterwards."""
