"""What the decode loop reads of a step's logits (`backends.logits`): the same numbers read on the
device (torch tensors, here on the CPU) as from host arrays, and the full row read only when a
processor bans the argmax. The loop over torch's static path never reads a full row."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kosmos2_ros.core.backends.base import BackendError
from kosmos2_ros.core.backends.logits import DeviceLogits, Readout, TokenScores, read_scores, stack_rows
from kosmos2_ros.core.model.decoding import NoRepeatNGram, candidate_cells, choose, token_prob

READOUT = Readout(lo=100, hi=164, tokens=(3, 7, 250))


def _logits(rows: int, vocab: int = 300, seed: int = 0) -> np.ndarray:
    z = (np.random.RandomState(seed).randn(rows, vocab) * 4).astype(np.float32)
    z[1, 17] = z[1, 42] = z[1].max() + 1.0          # a tie: the first index wins, as numpy's argmax
    return z


def test_device_read_equals_host_read_row_by_row() -> None:
    """The GPU's reduction (`read_on_device`, here on a CPU tensor) gives the host's numbers."""
    z = _logits(4)
    host = read_scores(z, READOUT)
    dev = DeviceLogits(torch.from_numpy(z)).read_on_device(READOUT)
    assert [s.argmax for s in dev] == [s.argmax for s in host] == [int(np.argmax(r)) for r in z]
    assert dev[1].argmax == 17
    for d, h, row in zip(dev, host, z):
        assert d.top == h.top == float(row.max())
        assert d.norm == pytest.approx(h.norm, rel=1e-6)
        np.testing.assert_array_equal(d.span, row[100:164])
        assert d.picked == h.picked == {t: float(row[t]) for t in (3, 7, 250)}
        for tok in (d.argmax, 3, 120, 250):
            assert d.prob(tok) == pytest.approx(token_prob(row, tok), rel=1e-6, abs=1e-12)


def test_only_the_callers_rows_are_read_in_their_order() -> None:
    z = _logits(4, seed=1)
    for read in (DeviceLogits.read, DeviceLogits.read_on_device):
        dev = read(DeviceLogits(torch.from_numpy(z), rows=[2, 0]), READOUT)
        assert [s.argmax for s in dev] == [int(np.argmax(z[2])), int(np.argmax(z[0]))]
        one = read(DeviceLogits(torch.from_numpy(z[3])), READOUT)
        assert len(one) == 1 and one[0].argmax == int(np.argmax(z[3]))


def test_stacked_rows_keep_their_order_and_stay_on_the_device() -> None:
    z = _logits(3, seed=2)
    parts = [DeviceLogits(torch.from_numpy(z[:2]), rows=[1]), DeviceLogits(torch.from_numpy(z[2]))]
    both = stack_rows(parts)
    assert isinstance(both, DeviceLogits) and both.shape == (2, 300)
    np.testing.assert_array_equal(np.asarray(both), z[[1, 2]])
    np.testing.assert_array_equal(stack_rows([z[0], z[1:]]), z)        # host arrays stay host arrays


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_row_is_a_backend_error_with_the_backends_reason(bad: float) -> None:
    z = _logits(2, seed=3)
    z[1, 5] = bad
    logits = DeviceLogits(torch.from_numpy(z), nonfinite_error="the engine produced non-finite logits (fp16?)")
    for read in (DeviceLogits.read, DeviceLogits.read_on_device):
        with pytest.raises(BackendError, match="fp16"):
            read(logits, READOUT)
        assert read(DeviceLogits(torch.from_numpy(z), rows=[0]), READOUT)[0].argmax == int(np.argmax(z[0]))


def _never_read_whole(scores: TokenScores) -> TokenScores:
    def refuse() -> np.ndarray:
        raise AssertionError("the full row was read")
    scores.read_full = refuse
    return scores


def test_choices_read_the_full_row_only_when_the_argmax_is_banned() -> None:
    z = _logits(2, seed=4)[0]
    best = int(np.argmax(z))
    scores = _never_read_whole(DeviceLogits(torch.from_numpy(z)).read_on_device(READOUT)[0])
    procs = (NoRepeatNGram(2),)
    assert choose(scores, [5, 9], procs) == best                         # nothing banned: no read
    allowed = np.arange(100, 164)
    banned_cell = 100 + int(np.argmax(z[100:164]))
    ids = [1, banned_cell, 1]                                            # (1, cell) seen: cell banned after 1
    want = choose(z, ids, procs, allowed)
    assert want != banned_cell and choose(scores, ids, procs, allowed) == want   # the span, no read
    on_device, on_host = candidate_cells(scores, banned_cell, _Vocab(), count=2), candidate_cells(z, banned_cell, _Vocab(), 2)
    assert [t for t, _ in on_device] == [t for t, _ in on_host]           # the same cells, from the span alone
    assert [p for _, p in on_device] == pytest.approx([p for _, p in on_host], rel=1e-6)
    banned_best = [1, best, 1]                                           # the argmax itself banned
    read = DeviceLogits(torch.from_numpy(z)).read_on_device(READOUT)[0]
    assert choose(read, banned_best, procs) == choose(z, banned_best, procs) != best


class _Vocab:
    """The tokens `candidate_cells` reads: 64 location tokens at ids 100..164, the control tokens and a
    yes/no answer's first tokens."""
    object_open, object_close, delimiter, eos = 3, 7, 250, 2
    yes_tokens, no_tokens = (20, 21), (30,)

    @staticmethod
    def patch_ids() -> tuple:
        return 100, 164


def test_the_loop_over_torchs_static_path_reads_no_whole_row(monkeypatch, tiny_model_dir) -> None:
    """Every task's tokens through the pipeline on torch's static path equal `generate`'s with every step's
    logits read by the GPU's reduction (`read_on_device`, on the CPU here) and reading a whole step refused:
    each token crossed as its argmax, normaliser, location span and control tokens (a banned argmax's row is
    the unit test above)."""
    from kosmos2_ros.core.backends.modules import load_kosmos2
    from kosmos2_ros.core.backends.torch.static import TorchStaticBackend
    from kosmos2_ros.core.model.loading import load_processor
    from kosmos2_ros.core.model.reference import reference_generate
    from kosmos2_ros.core.serving.config import Kosmos2Config
    from kosmos2_ros.core.serving.frames import Frame
    from kosmos2_ros.core.serving.pipeline import Command, Pipeline
    from kosmos2_ros.fixtures.checkpoints import EXPRESSIONS, toy_image

    reads = {"whole": 0, "rows": 0}
    real_row = DeviceLogits._row_numpy

    def counted_read(self, readout):  # noqa: ANN001, ANN202
        out = self.read_on_device(readout)
        reads["rows"] += len(out)
        return out

    def counted_row(self, r):  # noqa: ANN001, ANN202
        reads["whole"] += 1
        return real_row(self, r)

    def refuse(self, *args):  # noqa: ANN001, ANN202, ARG001
        raise AssertionError("the decode loop read every row of a step")
    monkeypatch.setattr(DeviceLogits, "read", counted_read)
    monkeypatch.setattr(DeviceLogits, "_row_numpy", counted_row)
    monkeypatch.setattr(DeviceLogits, "numpy", refuse)
    processor = load_processor(str(tiny_model_dir))
    model = load_kosmos2(str(tiny_model_dir))
    backend = TorchStaticBackend(str(tiny_model_dir), device="cpu")
    pipe = Pipeline(Kosmos2Config(model=str(tiny_model_dir), backend="torch", device="cpu", decoding="free",
                                  max_new_tokens=12, enable_3d=False), backend, processor)
    rgb = toy_image(41, size=128)
    commands = {f"<grounding><phrase> {EXPRESSIONS[1]}</phrase>": Command(id="r", task="refer", text=EXPRESSIONS[1]),
                "<grounding>An image of": Command(id="c", task="caption"),
                "<grounding> Question: what is on the left? Answer:": Command(id="q", task="vqa",
                                                                               text="what is on the left?"),
                "<grounding> Question: Is there a dog? Answer:": Command(id="y", task="check", text="Is there a dog?")}
    results = pipe.run_batch(list(commands.values()), Frame(rgb=rgb, stamp_ns=1, frame_id="cam"))
    for prompt, res in zip(commands, results):
        assert res.status == 0, res.error
        assert res.token_ids == reference_generate(model, processor, prompt, rgb, 12).new_ids
    # the check's p(yes) came from the same small read (its tokens are in the readout), equal to the host's
    host = Pipeline.load(Kosmos2Config(model=str(tiny_model_dir), backend="torch", torch_mode="reference",
                                       device="cpu", decoding="free", max_new_tokens=12, enable_3d=False))
    (ref,) = host.run_batch([commands["<grounding> Question: Is there a dog? Answer:"]],
                            Frame(rgb=rgb, stamp_ns=1, frame_id="cam"))
    assert results[-1].answer_probability == pytest.approx(ref.answer_probability, rel=1e-5)
    host.close()
    assert reads["rows"] >= sum(len(r.token_ids) for r in results)
    assert reads["whole"] == 0, reads       # no argmax banned on these prompts: no row crossed whole
    backend.close()
