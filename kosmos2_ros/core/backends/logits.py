"""What the decode loop reads of a step's next-token logits, computed where the logits are.

A step gives [rows, vocab] logits (65k floats a row) and the loop needs little of them: the
greedy choice (argmax, first on ties), the softmax normaliser for token probabilities, the
location tokens' logits (constrained boxes, candidates) and a few control tokens' (presence,
closing a box). `DeviceLogits` computes those where the logits are (a GPU) and brings back only
them, in one transfer a step; logits already on the host (onnxruntime) give the same
`TokenScores` from numpy. A row's full logits cross to the host only when a logits processor
bans its argmax (a repeated n-gram), which is rare.

The numbers are the ones `decoding.token_prob` defines: float32 exponentials of `z - max`
summed in float64.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import BackendError


class NonFiniteLogits(BackendError):
    """A row's logits hold NaN or infinity (the backend's precision overflowed)."""


@dataclass(frozen=True)
class Readout:
    """The token logits the loop reads besides the argmax: a contiguous span (the location tokens) and
    a few single tokens (control tokens)."""
    lo: int = 0
    hi: int = 0
    tokens: Tuple[int, ...] = ()


@dataclass
class TokenScores:
    """One row's next-token logits as far as the loop reads them."""
    argmax: int
    top: float                  # the argmax's logit
    norm: float                 # sum(exp(z - top)) over the vocabulary (float32 terms, float64 sum)
    span: np.ndarray            # float32 logits of readout.lo .. readout.hi
    picked: Dict[int, float]    # logits of readout.tokens
    readout: Readout
    read_full: Callable[[], np.ndarray] = field(repr=False, default=lambda: np.empty(0, np.float32))
    _full: Optional[np.ndarray] = field(default=None, repr=False)

    @classmethod
    def from_host(cls, logits: np.ndarray, readout: Readout = Readout()) -> TokenScores:
        z = np.asarray(logits, dtype=np.float32)
        arg = int(np.argmax(z))
        norm = float(np.exp(z - z[arg]).sum(dtype=np.float64))
        picked = {t: float(z[t]) for t in readout.tokens if t < z.shape[-1]}
        return cls(arg, float(z[arg]), norm, z[readout.lo:readout.hi], picked, readout, _full=z)

    def full(self) -> np.ndarray:
        """The whole row (float32; read from the device on first use)."""
        if self._full is None:
            self._full = np.asarray(self.read_full(), dtype=np.float32)
        return self._full

    def logit(self, token: int) -> float:
        token = int(token)
        if token == self.argmax:
            return self.top
        if self.readout.lo <= token < self.readout.lo + len(self.span):
            return float(self.span[token - self.readout.lo])
        if token in self.picked:
            return self.picked[token]
        return float(self.full()[token])

    def logits_at(self, tokens: np.ndarray) -> np.ndarray:
        """float32 logits of `tokens` (a span read where they all lie in it)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        lo = self.readout.lo
        if tokens.size and tokens.min() >= lo and tokens.max() < lo + len(self.span):
            return self.span[tokens - lo]
        return np.array([self.logit(t) for t in tokens], dtype=np.float32)

    def prob(self, token: int) -> float:
        """Softmax probability of `token` over the whole vocabulary (a float32 exponential over the float64
        normaliser, divided in float64 whatever numpy's promotion rules)."""
        return float(np.exp(np.float32(self.logit(token)) - np.float32(self.top))) / self.norm

    def span_probs(self) -> np.ndarray:
        """Softmax probabilities of the span's tokens (float64)."""
        return np.exp(self.span - np.float32(self.top)).astype(np.float64) / self.norm


def read_scores(logits: Any, readout: Readout) -> List[TokenScores]:
    """Each row's `TokenScores` ([vocab] logits: one row) from host arrays or `DeviceLogits`."""
    if isinstance(logits, DeviceLogits):
        return logits.read(readout)
    z = np.asarray(logits, dtype=np.float32)
    return [TokenScores.from_host(row, readout) for row in (z[None] if z.ndim == 1 else z)]


def stack_rows(parts: Sequence[Any]) -> Any:
    """Row sets (or single [vocab] rows) as one [rows, vocab] set, on the device where they are there."""
    if parts and all(isinstance(p, DeviceLogits) for p in parts):
        return DeviceLogits.stack(parts)
    return np.concatenate([np.asarray(p, dtype=np.float32).reshape(-1, np.shape(p)[-1]) for p in parts])


class DeviceLogits:
    """Logits in a torch tensor ([rows, vocab] or one [vocab] row), read on the device.

    `rows`: which of the tensor's rows are the caller's (a decode step's arena may hold idle rows).
    `on_device`: a context that makes the tensor's device and stream current (the backend's), so the
    reads queue behind the step that wrote the logits. Host code that wants every logit (tests, the
    precision check) gets them through `numpy()` / `np.asarray`.
    """

    def __init__(self, tensor: Any, rows: Optional[Sequence[int]] = None,
                 on_device: Optional[Callable[[], ContextManager[None]]] = None,
                 nonfinite_error: str = "the model produced non-finite logits") -> None:
        self._tensor = tensor
        self._one_row = tensor.dim() == 1
        count = 1 if self._one_row else int(tensor.shape[0])
        self._rows = list(range(count)) if rows is None else [int(r) for r in rows]
        self._on_device = on_device
        self.nonfinite_error = nonfinite_error

    @classmethod
    def stack(cls, parts: Sequence[DeviceLogits]) -> DeviceLogits:
        """Single rows or row sets of one backend as one [rows, vocab] set (a copy on the device)."""
        import torch

        first = parts[0]
        with first._device():
            tensor = torch.cat([p._tensor[None] if p._one_row else p._tensor[p._rows] for p in parts])
        return cls(tensor, None, first._on_device, first.nonfinite_error)

    # -- the loop's read --------------------------------------------------------------------------
    def read(self, readout: Readout) -> List[TokenScores]:
        """Argmax, its logit, the normaliser, the span and picked tokens of every row. On a GPU they are
        computed there and cross in one transfer (`read_on_device`); a CPU tensor is read in place as a
        host array (its memory is the host's: nothing to transfer). Raises `NonFiniteLogits` when a row
        holds NaN or infinity."""
        if self._tensor.device.type == "cpu":
            z = self._tensor.detach().float().numpy()
            z = z[None] if self._one_row else z
            out = []
            for r in self._rows:
                if not np.isfinite(z[r]).all():
                    raise NonFiniteLogits(self.nonfinite_error)
                out.append(TokenScores.from_host(z[r], readout))
            return out
        return self.read_on_device(readout)

    def read_on_device(self, readout: Readout) -> List[TokenScores]:
        """`read` computed by torch where the tensor is: float32 argmax (as index), logit, finiteness,
        picked tokens and span, with the float64 normaliser's 8 bytes carried as two float32 slots, all
        in one [rows, 5 + tokens + span] float32 copy to the host (about 4 KB a row, not 260 KB)."""
        import torch

        tokens = [t for t in readout.tokens if t < self._tensor.shape[-1]]
        with self._device(), torch.no_grad():
            z = self._tensor.float()
            z = z[None] if self._one_row else z
            arg = torch.argmax(z, dim=-1, keepdim=True)          # first index of the max, as numpy's
            top = torch.gather(z, 1, arg)
            norm = torch.exp(z - top).sum(dim=-1, keepdim=True, dtype=torch.float64)
            finite = torch.isfinite(z).all(dim=-1, keepdim=True)
            parts = [arg.float(), top, finite.float(), norm.view(torch.float32),
                     *[z[:, t:t + 1] for t in tokens], z[:, readout.lo:min(readout.hi, z.shape[-1])]]
            host = torch.cat(parts, dim=1).cpu().numpy()
        norms = np.ascontiguousarray(host[:, 3:5]).view(np.float64)[:, 0]
        out = []
        for r in self._rows:
            row = host[r]
            if row[2] != 1.0:
                raise NonFiniteLogits(self.nonfinite_error)
            out.append(TokenScores(
                argmax=int(row[0]), top=float(row[1]), norm=float(norms[r]), span=row[5 + len(tokens):].copy(),
                picked={t: float(v) for t, v in zip(tokens, row[5:5 + len(tokens)])}, readout=readout,
                read_full=lambda r=r: self._row_numpy(r)))
        return out

    def check_finite(self) -> None:
        """Raise `NonFiniteLogits` when a caller's row holds NaN or infinity (one small read): for logits
        nobody reads, such as a shared prefix's, whose cache must not be kept from an overflowed forward."""
        import torch

        with self._device(), torch.no_grad():
            z = self._tensor[None] if self._one_row else self._tensor
            finite = torch.isfinite(z).all(dim=-1).cpu().numpy()
        if not all(bool(finite[r]) for r in self._rows):
            raise NonFiniteLogits(self.nonfinite_error)

    # -- the whole logits, for host code --------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        with self._device():
            host = self._tensor.float().cpu().numpy()
        return host if self._one_row else host[self._rows]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)

    @property
    def shape(self) -> Tuple[int, ...]:
        vocab = int(self._tensor.shape[-1])
        return (vocab,) if self._one_row else (len(self._rows), vocab)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> Any:
        if self._one_row:
            return self.numpy()[index]
        if isinstance(index, int):
            return DeviceLogits(self._tensor[self._rows[index]], None, self._on_device, self.nonfinite_error)
        return self.numpy()[index]

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))

    def _row_numpy(self, r: int) -> np.ndarray:
        with self._device():
            row = self._tensor if self._one_row else self._tensor[r]
            return row.float().cpu().numpy()

    def _device(self) -> ContextManager[None]:
        import contextlib

        return self._on_device() if self._on_device is not None else contextlib.nullcontext()
