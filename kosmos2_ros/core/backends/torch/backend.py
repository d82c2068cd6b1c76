"""The torch backend: transformers' modules step by step (`TorchBackend`, CPU or CUDA; fp32, fp16
or bf16), the reference every other backend is compared with, and `create`, which picks it or,
on a GPU, the static path beside it (`static.TorchStaticBackend`).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ...defaults import DTYPE_NAMES, TORCH_MODES
from ..base import Backend, BackendUnavailable, pack_rows
from ..kv_cache import ARENA_BUDGET_MB
from ..logits import DeviceLogits
from ..modules import image_features
from .loading import load_model, resolve_device

DTYPES = DTYPE_NAMES


@dataclass
class TorchCache:
    kv: Any          # transformers Cache
    length: int


#: What `torch_mode` takes: `auto` = static on a GPU, reference on the CPU.
MODES = TORCH_MODES


def create(model_dir: str, device: str = "auto", precision: str = "fp32", allow_pickle: bool = False,
           model: Any = None, cuda_graph: bool = True, torch_mode: str = "auto",
           arena_budget_mb: float = ARENA_BUDGET_MB) -> Backend:
    """The torch backend: on a GPU (mode auto) the static path (`static.TorchStaticBackend`: static KV
    arena, the decode step as a CUDA graph); on the CPU, or with mode reference, transformers' own
    modules step by step (`TorchBackend`, the reference every backend is held equal to)."""
    if torch_mode not in MODES:
        raise ValueError(f"torch_mode must be one of {', '.join(MODES)}, got {torch_mode!r}")
    if torch_mode == "static" or (torch_mode == "auto" and resolve_device(device).startswith("cuda")):
        from .static import TorchStaticBackend

        return TorchStaticBackend(model_dir, device, precision, allow_pickle, model, cuda_graph, arena_budget_mb)
    return TorchBackend(model_dir, device, precision, allow_pickle, model)


class TorchBackend(Backend):
    name = "torch"
    mode = "reference"
    encodes_batches = True

    def __init__(self, model_dir: str, device: str = "auto", precision: str = "fp32",
                 allow_pickle: bool = False, model: Any = None) -> None:
        import torch

        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        self.device = resolve_device(device)
        self.precision = precision
        self.dtype = getattr(torch, DTYPES[precision])
        if self.device == "cpu" and precision == "fp16":
            raise BackendUnavailable("fp16 on CPU is not supported by torch matmuls; use fp32 or bf16 on CPU")
        if model is None:
            model = load_model(model_dir, precision, allow_pickle)
        self.model = model.to(self.device).eval()
        text_cfg = self.model.config.text_config
        self.vocab_size = int(text_cfg.vocab_size)
        self.pad_token_id = int(text_cfg.pad_token_id if text_cfg.pad_token_id is not None else 1)
        self._torch = torch
        params = inspect.signature(self.model.text_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # The lm_head on the last position only, as `generate` does: a prompt's other positions'
        # logits are never read, and over a 65k vocabulary they cost more than the prompt's layers.
        keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self._last_only = {keep: 1} if keep else {}

    # -- Backend ---------------------------------------------------------------------------
    def encode_image(self, pixel_values: np.ndarray) -> Any:
        torch = self._torch
        with torch.inference_mode():
            pv = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(self.device, self.dtype)
            return image_features(self.model, pv)

    def prefill_images(self, image_embeds: Sequence[Any], input_ids: Sequence[int],
                       image_mask: Sequence[int]) -> List[TorchCache]:
        """The same prompt head on several images in one forward; each row's cache split out."""
        if len(image_embeds) < 2:
            return super().prefill_images(image_embeds, input_ids, image_mask)
        torch = self._torch
        from transformers import DynamicCache

        n, length = len(image_embeds), len(input_ids)
        kv = DynamicCache(config=self.model.config.text_config)
        with torch.inference_mode():
            self.model.text_model(
                input_ids=torch.tensor([list(input_ids)] * n, dtype=torch.long, device=self.device),
                attention_mask=torch.ones((n, length), dtype=torch.long, device=self.device),
                image_embeds=torch.cat(list(image_embeds)),
                image_embeds_position_mask=torch.tensor([list(image_mask)] * n, dtype=torch.long, device=self.device),
                use_cache=True, **{self._cache_kw: kv})
            out = []
            for b in range(n):
                row = DynamicCache(config=self.model.config.text_config)
                for i, layer in enumerate(kv.layers):
                    row.update(layer.keys[b:b + 1].clone(), layer.values[b:b + 1].clone(), i)
                out.append(TorchCache(row, length))
        return out

    def prefill(self, image_embeds: Any, input_ids: Sequence[int], image_mask: Sequence[int],
                cache: Optional[TorchCache] = None) -> Tuple[Any, TorchCache]:
        torch = self._torch
        from transformers import DynamicCache

        past = 0 if cache is None else cache.length
        kv = DynamicCache(config=self.model.config.text_config) if cache is None else copy.deepcopy(cache.kv)
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)
        kwargs = {self._cache_kw: kv}
        if past == 0:
            kwargs["image_embeds"] = image_embeds
            kwargs["image_embeds_position_mask"] = torch.tensor([list(image_mask)], dtype=torch.long,
                                                                device=self.device)
        with torch.inference_mode():
            out = self.model.text_model(
                input_ids=ids, attention_mask=torch.ones((1, past + ids.shape[1]), dtype=torch.long,
                                                         device=self.device),
                use_cache=True, **kwargs, **self._last_only)
        logits = self._last_logits(out)
        logits.check_finite()   # a shared prefix's logits are never read: its cache must not come from an overflow
        return logits, TorchCache(getattr(out, self._cache_kw, None) or kv, past + ids.shape[1])

    def decode(self, cache: TorchCache, token_id: int) -> Tuple[Any, TorchCache]:
        torch = self._torch
        ids = torch.tensor([[int(token_id)]], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model.text_model(
                input_ids=ids, attention_mask=torch.ones((1, cache.length + 1), dtype=torch.long,
                                                         device=self.device),
                use_cache=True, **{self._cache_kw: cache.kv})
        return self._last_logits(out), TorchCache(cache.kv, cache.length + 1)

    def decode_batch(self, caches: list, token_ids: list) -> Tuple[Any, list]:
        """One step for several rows in one forward (`_packed_forward` with one token per row)."""
        if len(caches) < 2:
            return super().decode_batch(caches, token_ids)
        return self._packed_forward(caches, [[int(t)] for t in token_ids])

    def prefill_batch(self, caches: list, chunks: list) -> Tuple[Any, list]:
        """Text chunks appended to several caches in one forward (a frame's standing queries)."""
        if len(caches) < 2 or any(c is None or c.length == 0 for c in caches):
            return super().prefill_batch(caches, chunks)
        logits, out = self._packed_forward(caches, [list(c) for c in chunks])
        logits.check_finite()
        return logits, out

    can_truncate = True

    def truncate(self, cache: TorchCache, length: int) -> TorchCache:
        kv = copy.deepcopy(cache.kv)
        drop = cache.length - int(length)
        if drop > 0:
            kv.crop(-drop)   # a negative crop removes tokens from the end in transformers 4.x and 5.x
        return TorchCache(kv, int(length))

    def fork(self, cache: TorchCache) -> TorchCache:
        return TorchCache(copy.deepcopy(cache.kv), cache.length)

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    # -- helpers ---------------------------------------------------------------------------
    def _packed_forward(self, caches: List[TorchCache], chunks: List[List[int]]) -> Tuple[Any, list]:
        """Chunk b appended to cache b for every row in one forward -> (rows of last logits, new caches).

        Rows are laid out as the graph backends lay them out (`base.pack_rows`): the row's past,
        a masked hole up to the longest past, masked left padding, then its chunk, with explicit
        positions. Masked keys get exactly zero attention weight, so each row computes what it
        computes alone. The given caches are not modified.
        """
        torch = self._torch
        from transformers import DynamicCache

        lengths = [int(c.length) for c in caches]
        rows = pack_rows(lengths, chunks, [[0] * len(c) for c in chunks], self.pad_token_id)
        pmax, width = rows.pmax, rows.pmax + rows.smax
        packed = DynamicCache(config=self.model.config.text_config)
        for i in range(len(caches[0].kv.layers)):
            keys, values = [], []
            for c, n in zip(caches, lengths):
                layer, pad = c.kv.layers[i], (0, 0, 0, pmax - n)
                keys.append(torch.nn.functional.pad(layer.keys[:, :, :n], pad))
                values.append(torch.nn.functional.pad(layer.values[:, :, :n], pad))
            packed.update(torch.cat(keys), torch.cat(values), i)

        def tensor(arr: np.ndarray) -> Any:
            return torch.from_numpy(arr).to(self.device)

        with torch.inference_mode():
            out = self.model.text_model(
                input_ids=tensor(rows.input_ids), attention_mask=tensor(rows.attention_mask),
                position_ids=tensor(rows.position_ids), use_cache=True, **{self._cache_kw: packed},
                **self._last_only)
            logits = self._finite(out.logits[:, -1])
            new = []
            for b, (n, k) in enumerate(zip(lengths, rows.lens)):
                row = DynamicCache(config=self.model.config.text_config)
                for i, layer in enumerate(packed.layers):
                    row.update(torch.cat([layer.keys[b:b + 1, :, :n], layer.keys[b:b + 1, :, width - k:]], dim=2),
                               torch.cat([layer.values[b:b + 1, :, :n], layer.values[b:b + 1, :, width - k:]], dim=2), i)
                new.append(TorchCache(row, n + k))
        return logits, new

    def _last_logits(self, out: Any) -> DeviceLogits:
        return self._finite(out.logits[0, -1])

    def _finite(self, logits: Any) -> DeviceLogits:
        """The logits left where they are, for the loop's small read (`logits`, which raises
        BackendError when any is not finite)."""
        return DeviceLogits(logits, None, None, "the model produced non-finite logits (overflow in this precision?)")
