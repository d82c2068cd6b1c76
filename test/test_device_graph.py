"""What the TensorRT engines and torch's static path share (`backends.device_graph`): the step's
buffers and their scatter into the arena, and the 256-byte alignment of every array bound."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from kosmos2_ros.core.backends.device_graph import StepBuffers
from kosmos2_ros.core.backends.kv_cache import NUMPY, SLAB_ALIGN, ArenaPool, ArrayOps, KVArena, KVCache, aligned_slabs

TORCH = ArrayOps(zeros=lambda shape: torch.zeros(shape), cat=lambda parts, axis: torch.cat(parts, dim=axis))


def test_step_scatter_writes_what_the_host_path_writes():
    """The device-side scatter of the CUDA-graph step (here on CPU torch) matches `write_host`."""
    ops = ArrayOps(zeros=lambda shape: torch.zeros(shape), cat=lambda parts, axis: torch.cat(parts, dim=axis))
    rng = np.random.RandomState(0)
    lengths = [5, 9, 7]
    host_caches = [KVCache(n, [rng.randn(1, 2, n, 3).astype(np.float32) for _ in range(4)]) for n in lengths]
    dev_caches = [KVCache(c.length, [torch.from_numpy(a.copy()) for a in c.kv]) for c in host_caches]
    host_arena, host_rows = ArenaPool(NUMPY, 4, 2, 3, 4096).arena_for(host_caches)
    dev_arena, dev_rows = ArenaPool(ops, 4, 2, 3, 4096).arena_for(dev_caches)
    active = [0, 2]                                        # row 1 has finished: it idles
    feeds = dev_arena.step_feeds([dev_rows[i] for i in active], [11, 12], pad_id=1)
    step = StepBuffers(torch, dev_arena, vocab_size=10, device="cpu")
    step.load(torch, feeds)
    for name in ("input_ids", "position_ids", "attention_mask"):
        assert step.inputs[name].numpy().tolist() == getattr(feeds, name).tolist()
    assert step.columns.numpy().tolist() == feeds.columns.tolist()
    logits = torch.arange(40, dtype=torch.float32).view(4, 10)
    step.logits = logits
    np.testing.assert_array_equal(np.asarray(step.read_logits([0, 1], contextlib.nullcontext, "")), logits[:2].numpy())
    want = logits[[2, 0]].numpy().copy()
    kept = step.read_logits([2, 0], contextlib.nullcontext, "")
    step.logits.fill_(-1.0)                                # the next step writes the buffer: the read is a copy
    np.testing.assert_array_equal(np.asarray(kept), want)
    new = rng.randn(4, 3, 2, 1, 3).astype(np.float32)
    step.new.copy_(torch.from_numpy(new))
    step.scatter()
    host_arena.write_host(host_arena.step_feeds([host_rows[i] for i in active], [11, 12], pad_id=1), list(new))
    got, want = dev_arena.kv.numpy(), host_arena.kv
    np.testing.assert_array_equal(got[:, :, :, :dev_arena.capacity], want[:, :, :, :host_arena.capacity])
    np.testing.assert_array_equal(got[:, 1, :, dev_arena.capacity], new[:, 1, :, 0])   # idle row: scratch only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, heads, capacity, head_dim", [(1, 4, 64, 8), (3, 4, 128, 12), (8, 2, 192, 16)])
def test_every_bound_array_is_256_byte_aligned(dtype, rows, heads, capacity, head_dim):
    """The arena's KV arrays and the step's new keys/values are bound one by one: each starts a
    multiple of 256 bytes after its buffer's start (CUDA's allocator gives buffers 512-byte
    alignment), for tiny fp16/bf16 shapes whose unpadded slabs would sit at 128-byte offsets."""
    ops = ArrayOps(zeros=lambda shape: torch.zeros(shape, dtype=dtype), cat=TORCH.cat)
    arena = KVArena(ops, 6, rows, heads, capacity, head_dim)
    step = StepBuffers(torch, arena, vocab_size=10, device="cpu")
    for arrays in (arena.kv, step.new):
        base = arrays[0].data_ptr()
        for j in range(arrays.shape[0]):
            assert (arrays[j].data_ptr() - base) % 256 == 0 and arrays[j].is_contiguous()
    staged = [step.inputs[n] for n in ("input_ids", "position_ids", "attention_mask")] + [step.columns]
    base = staged[0].data_ptr()     # the inputs a step loads: pieces of one buffer, each bound on its own
    assert all((t.data_ptr() - base) % 256 == 0 and t.is_contiguous() for t in staged)
    assert len({t.data_ptr() for t in staged}) == len(staged)


def test_aligned_slabs_are_views_of_one_buffer():
    slabs = aligned_slabs(NUMPY, 3, (2, 5))
    assert slabs.shape == (3, 2, 5) and all(np.shares_memory(slabs[0], slabs[j]) is False for j in (1, 2))
    slabs[1] = 7
    assert slabs.base is not None and (slabs.base.reshape(3, -1)[1, :10] == 7).all()
    assert slabs.base.reshape(3, -1).shape[1] == SLAB_ALIGN
