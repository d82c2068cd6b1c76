"""The TensorRT backend's binding logic, run end to end with a recorder in place of TensorRT.

TensorRT cannot be installed on these machines, so what is under test here is *our* code: the
backend (`tensorrt.backend`, `tensorrt.binding`, `device_graph`) as it packs prefills, splits
batches to the engine's profiles, keeps the static arena and binds every tensor. A recorder
stands in for each execution context: it holds the optimisation profiles `engines.profiles`
builds, and it fails on what TensorRT forbids (NvInferRuntime.h, setTensorAddress / enqueueV3): a
null address, a misaligned one, two live tensors overlapping in memory, an input shape outside
the context's profile, an output buffer of another shape than the engine computes. Its
`execute_async_v3` reads the bound inputs from their addresses, runs the real exported fp32 ONNX
graph the engine would be built from (onnxruntime, CPU) and writes the outputs to the bound
addresses. The buffers are CPU torch tensors (the allocator aligns them to 64 bytes, so the
recorder checks 64 here; the 256-byte offsets of the arrays we place are `test_device_graph`'s).
Tokens must equal the torch reference's.

CUDA graphs have a stand-in too (`GraphStandIn`): capture runs the step once and records the state
(input shapes, addresses) of every context it enqueued; replay fails if any of them changed since
(TensorRT's rule for graphs captured around `enqueueV3`), then runs the step again.
"""
from __future__ import annotations

import ctypes
import types
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch

from kosmos2_ros.core.backends.base import BackendError
from kosmos2_ros.core.backends.onnx import export
from kosmos2_ros.core.backends.tensorrt import binding, engines
from kosmos2_ros.core.backends.tensorrt.backend import TensorRTBackend
from kosmos2_ros.core.backends.torch.backend import TorchBackend
from kosmos2_ros.core.model.decoding import Row, generate
from kosmos2_ros.core.model.loading import TextCodec, load_processor

CPU_ALIGNMENT = 64
NP_TYPES = {"FLOAT": np.float32, "INT64": np.int64}
LIMITS = engines.EngineLimits(max_batch=2, max_prompt=16, max_context=1024)


class Recorder:
    """An execution context: profiles checked, addresses checked, the ONNX graph run on the bound memory."""

    capturing: Optional[List[Recorder]] = None    # set by GraphStandIn while it captures

    def __init__(self, engine: FakeEngine, strategy: str) -> None:
        self.engine, self.strategy = engine, strategy
        self.profile = 0
        self.shapes: Dict[str, tuple] = {}
        self.addresses: Dict[str, int] = {}
        self.address_sets = 0
        self.profile_set = False
        self.memory: Optional[tuple] = None
        self.runs = 0

    def state(self) -> tuple:
        return tuple(sorted(self.shapes.items())), tuple(sorted(self.addresses.items()))

    def set_device_memory(self, memory: int, size: int) -> None:
        assert self.strategy == "USER_MANAGED" and memory and size > 0
        assert self.profile_set, "memory given before the profile it is sized for was selected"
        self.memory = (memory, size)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        assert 0 <= index < len(self.engine.profiles)
        self.profile, self.profile_set = index, True
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        lo, _, hi = self.engine.profiles[self.profile][name]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        assert ptr, f"{name}: null address (enqueueV3 needs a non-null address for every input)"
        assert ptr % CPU_ALIGNMENT == 0, f"{name}: misaligned address {ptr:#x}"
        self.addresses[name] = ptr
        self.address_sets += 1
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        return self.engine.output_shape(name, self.shapes)

    def execute_async_v3(self, stream: int) -> bool:
        e = self.engine
        assert self.strategy != "USER_MANAGED" or self.memory is not None, "enqueue before set_device_memory"
        if Recorder.capturing is not None:
            Recorder.capturing.append(self)
        spans = []
        arrays = {}
        for name in e.inputs + e.outputs:
            assert name in self.addresses, f"{name} has no address"
            shape = self.shapes[name] if name in e.inputs else e.output_shape(name, self.shapes)
            dtype = np.dtype(NP_TYPES[e.types[name]])
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if nbytes:
                spans.append((self.addresses[name], self.addresses[name] + nbytes, name))
                raw = (ctypes.c_uint8 * nbytes).from_address(self.addresses[name])
                arrays[name] = np.ctypeslib.as_array(raw).view(dtype).reshape(shape)
            else:
                arrays[name] = np.zeros(shape, dtype=dtype)
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            assert end <= start, f"tensors {a} and {b} overlap in memory"
        out = e.session.run(e.outputs, {n: np.array(arrays[n]) for n in e.inputs})
        for name, value in zip(e.outputs, out):
            arrays[name][...] = value
        self.runs += 1
        return True


class GraphStandIn:
    """Stands in for CUDA graph capture on the CPU (the backend's `_graph_capture`), counting captures."""

    def __init__(self) -> None:
        self.captures = 0
        self.fresh_pools: List[bool] = []

    def capture(self, launch, fresh_pool: bool):
        self.fresh_pools.append(fresh_pool)
        Recorder.capturing = []
        try:
            launch()
            states = [(ctx, ctx.state()) for ctx in Recorder.capturing]
        finally:
            Recorder.capturing = None
        self.captures += 1
        return types.SimpleNamespace(replay=lambda: self._replay(launch, states))

    @staticmethod
    def _replay(launch, states) -> None:
        for ctx, captured in states:
            assert ctx.state() == captured, "a graph replayed on a context whose shapes or addresses changed since capture"
        launch()


class FakeEngine:
    """An engine's I/O description (names, dtypes, profiles) over the real exported ONNX graph."""

    def __init__(self, graph: str, manifest: dict, profiles: list) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.types = {i.name: "INT64" if "int64" in i.type else "FLOAT"
                      for i in self.session.get_inputs() + self.session.get_outputs()}
        self.manifest, self.profiles = manifest, profiles
        self.contexts = []
        self.num_io_tensors = len(self.inputs) + len(self.outputs)
        self.device_memory_size_v2 = 1 << 20

    def get_tensor_name(self, i: int) -> str:
        return (self.inputs + self.outputs)[i]

    def get_tensor_dtype(self, name: str):
        return types.SimpleNamespace(name=self.types[name])

    def get_device_memory_size_for_profile_v2(self, index: int) -> int:
        return (index + 1) << 20

    def create_execution_context(self, strategy: str) -> Recorder:
        ctx = Recorder(self, strategy)
        self.contexts.append(ctx)
        return ctx

    def output_shape(self, name: str, shapes: Dict[str, tuple]) -> tuple:
        m = self.manifest
        if name == "image_embeds":
            return (shapes["pixel_values"][0], m["image_tokens"], m["embed_dim"])
        batch, seq = shapes["input_ids"]
        if name == "logits":
            return (batch, m["vocab_size"])
        return (batch, m["heads"], seq, m["head_dim"])


@pytest.fixture
def trt_backend(tiny_model_dir, tmp_path, monkeypatch):
    """The real TensorRTBackend over recorders, on CPU tensors, with profiles of 2 rows and 16 tokens."""
    graphs, manifest = export.ensure_exported(str(tiny_model_dir), str(tmp_path))
    shapes = engines.profiles(manifest, LIMITS)
    fakes = {"vision": FakeEngine(str(graphs / manifest["files"]["vision"]), manifest, shapes["vision"]),
             "decoder": FakeEngine(str(graphs / manifest["files"]["decoder"]), manifest, shapes["decoder"])}
    fake_trt = types.SimpleNamespace(__version__="10.3.0", ExecutionContextAllocationStrategy=types.SimpleNamespace(
        STATIC="STATIC", ON_PROFILE_CHANGE="ON_PROFILE_CHANGE", USER_MANAGED="USER_MANAGED"))
    meta = {"manifest": manifest, "limits": LIMITS.__dict__, "precision": "fp32", "files": {}}
    monkeypatch.setattr(engines, "require_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(engines, "require_cuda_torch", lambda: torch)
    monkeypatch.setattr(engines, "cuda_device", lambda torch, device: "cpu")
    monkeypatch.setattr(engines, "compute_capability", lambda torch, device: (8, 7))
    monkeypatch.setattr(engines, "ensure_engines", lambda *a, **k: (tmp_path, meta))
    monkeypatch.setattr(engines, "load_engines", lambda *a, **k: fakes)
    monkeypatch.setattr(binding, "ALIGNMENT", CPU_ALIGNMENT)
    logged = []
    backend = TensorRTBackend(str(tiny_model_dir), precision="fp32", artifacts_dir=str(tmp_path), log=logged.append)
    yield backend, fakes, logged
    backend.close()


PROMPTS = ("<grounding><phrase> the red mug</phrase>", "<grounding>An image of",
           "<grounding> Question: what is on the left? Answer:", "<grounding>Describe this image in detail:")


def test_tokens_equal_the_reference_through_the_recorded_bindings(trt_backend, tiny_model_dir):
    """Five rows of ~75-token prompts (64 image positions) against profiles of 2 rows and 16 tokens:
    prefill from scratch binds empty pasts (the dummy, never null), long prompts go in pieces, rows
    decode in groups of 2 on arenas of their own; every call stays inside its profile."""
    backend, fakes, _ = trt_backend
    codec = TextCodec(load_processor(str(tiny_model_dir)))
    ref = TorchBackend(str(tiny_model_dir), device="cpu")
    pv = np.random.RandomState(0).rand(1, 3, 224, 224).astype(np.float32)
    rows = [Row(codec.encode(p).input_ids, codec.encode(p).image_mask, n)
            for p, n in zip(PROMPTS + PROMPTS[:1], (10, 6, 9, 12, 3))]
    want = [g.token_ids for g in generate(ref, ref.encode_image(pv), rows, codec.vocab)]
    got = [g.token_ids for g in generate(backend, backend.encode_image(pv), rows, codec.vocab)]
    assert got == want
    constrained = [Row(r.input_ids, r.image_mask, 8, constrained=True) for r in rows[:1]]
    assert [g.token_ids for g in generate(backend, backend.encode_image(pv), constrained, codec.vocab)] == \
        [g.token_ids for g in generate(ref, ref.encode_image(pv), constrained, codec.vocab)]
    vision, (prefill, *steps) = fakes["vision"].contexts, fakes["decoder"].contexts
    assert vision[0].runs >= 2 and prefill.runs > len(rows) and steps and all(s.runs > 0 for s in steps)
    ref.close()


def test_contexts_allocate_for_their_own_profile_and_say_what_they_take(trt_backend, tiny_model_dir):
    backend, fakes, logged = trt_backend
    (vision,), (prefill,) = fakes["vision"].contexts, fakes["decoder"].contexts
    assert vision.strategy == "STATIC"
    assert (prefill.strategy, prefill.profile) == ("ON_PROFILE_CHANGE", 0)
    assert logged == ["tensorrt: vision context: 1.0 MiB of device memory",
                      "tensorrt: decoder prefill context: 1.0 MiB of device memory",
                      "tensorrt: decoder step contexts: 2.0 MiB of device memory, shared"]
    codec = TextCodec(load_processor(str(tiny_model_dir)))
    pv = np.random.RandomState(0).rand(1, 3, 224, 224).astype(np.float32)
    ids = codec.encode(PROMPTS[0])
    generate(backend, backend.encode_image(pv), [Row(ids.input_ids, ids.image_mask, 3)], codec.vocab)
    (_, step), scratch = fakes["decoder"].contexts, backend._step_scratch
    assert (step.strategy, step.profile) == ("USER_MANAGED", 1)
    assert step.memory == (scratch.data_ptr(), scratch.numel()) and scratch.numel() >= 2 << 20
    assert any("arena 1 x 128 tokens made" in line for line in logged)


def test_graphs_replay_on_the_context_they_were_captured_with(trt_backend, tiny_model_dir):
    """Arena A (one row), then arena B (two rows), then A again, each step replayed as a captured graph:
    every arena's step has its own context, bound once, so A's graph replays on the state it was captured
    with (one context re-bound for B, as before, fails here) and tokens equal the reference's."""
    backend, fakes, _ = trt_backend
    stand_in = GraphStandIn()
    backend._graph_capture = stand_in
    backend.set_cuda_graph(True)
    codec = TextCodec(load_processor(str(tiny_model_dir)))
    ref = TorchBackend(str(tiny_model_dir), device="cpu")
    pv = np.random.RandomState(0).rand(1, 3, 224, 224).astype(np.float32)
    enc = [codec.encode(p) for p in PROMPTS]
    one = [Row(enc[0].input_ids, enc[0].image_mask, 8)]
    two = [Row(e.input_ids, e.image_mask, 8) for e in enc[1:3]]
    for rows in (one, two, one, two):
        want = [g.token_ids for g in generate(ref, ref.encode_image(pv), rows, codec.vocab)]
        assert [g.token_ids for g in generate(backend, backend.encode_image(pv), rows, codec.vocab)] == want
    stats = backend.graph_stats
    assert stand_in.captures == stats.captures == stats.step_buffers == 2       # A and B, once each
    assert stand_in.fresh_pools == [True, False]            # B joins A's pool while A's graph lives
    assert stats.replays > stats.plain_steps > 0
    steps = fakes["decoder"].contexts[1:]
    assert len(steps) == 2 and all(s.address_sets == len(s.addresses) for s in steps)   # each bound once
    backend.set_cuda_graph(False)                     # off at runtime: no graph is replayed again
    replays = stats.replays
    generate(backend, backend.encode_image(pv), one, codec.vocab)
    assert stats.replays == replays and stand_in.captures == 2
    backend.set_cuda_graph(True)                      # on again: every graph was dropped, so a new pool
    generate(backend, backend.encode_image(pv), one, codec.vocab)
    assert stand_in.fresh_pools == [True, False, True]
    ref.close()


def test_one_context_rebound_per_arena_breaks_a_replay(trt_backend, tiny_model_dir, monkeypatch):
    """The check above is live: with the earlier design (one step context, re-bound whenever another arena's
    step runs plainly), replaying A's graph after B's plain run is caught."""
    backend, _, _ = trt_backend
    shared = {}

    def prepare_shared(step):
        prepare(step)
        step.context = shared.setdefault("ctx", step.context)

    def launch_rebinding(step):
        inputs = dict(step.inputs, image_embeds=backend._no_image,
                      **{n: step.arena.kv[j] for j, n in enumerate(backend._kv_names)})
        outputs = {"logits": step.logits, **{n: step.new[j] for j, n in enumerate(backend._new_names)}}
        binding.bind(step.context, inputs, outputs, backend._dummy.data_ptr())
        launch(step)

    prepare, launch = backend._prepare_step, backend._launch_step
    monkeypatch.setattr(backend, "_prepare_step", prepare_shared)
    monkeypatch.setattr(backend, "_launch_step", launch_rebinding)
    backend._graph_capture = GraphStandIn()
    backend.set_cuda_graph(True)
    codec = TextCodec(load_processor(str(tiny_model_dir)))
    embeds = backend.encode_image(np.random.RandomState(0).rand(1, 3, 224, 224).astype(np.float32))
    enc = [codec.encode(p) for p in PROMPTS[:3]]
    generate(backend, embeds, [Row(enc[0].input_ids, enc[0].image_mask, 8)], codec.vocab)        # A captured
    generate(backend, embeds, [Row(e.input_ids, e.image_mask, 3) for e in enc[1:]], codec.vocab)   # B re-binds
    with pytest.raises(AssertionError, match="replayed on a context whose shapes or addresses changed"):
        generate(backend, embeds, [Row(enc[0].input_ids, enc[0].image_mask, 8)], codec.vocab)


class _Ctx:
    """A context that answers as told (for the refusals bind must turn into errors)."""

    def __init__(self, shape_ok=True, address_ok=True, out_shape=(2, 3)):
        self.shape_ok, self.address_ok, self.out_shape = shape_ok, address_ok, out_shape
        self.addresses = {}

    def set_input_shape(self, name, shape):
        return self.shape_ok

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return self.address_ok

    def get_tensor_shape(self, name):
        return self.out_shape


def test_bind_refuses_what_tensorrt_would_refuse(monkeypatch):
    assert binding.ALIGNMENT == 256
    monkeypatch.setattr(binding, "ALIGNMENT", CPU_ALIGNMENT)   # CPU buffers: 64-byte aligned
    x, out = torch.zeros(64, dtype=torch.float32), torch.zeros(2, 3)
    with pytest.raises(BackendError, match="outside the engine's optimisation profile"):
        binding.bind(_Ctx(shape_ok=False), {"x": x}, {"y": out}, dummy=256)
    with pytest.raises(BackendError, match="TensorRT refused the address of tensor x"):
        binding.bind(_Ctx(address_ok=False), {"x": x}, {"y": out}, dummy=256)
    with pytest.raises(BackendError, match=r"engine output y has shape \(2, 4\) for these inputs, its buffer \(2, 3\)"):
        binding.bind(_Ctx(out_shape=(2, 4)), {"x": x}, {"y": out}, dummy=256)
    ctx = _Ctx()
    binding.bind(ctx, {"x": x, "empty": torch.zeros(1, 4, 0, 8)}, {"y": out}, dummy=4096)
    assert ctx.addresses["empty"] == 4096 and ctx.addresses["x"] == x.data_ptr()   # empty: the dummy, never 0
    with pytest.raises(BackendError, match="not 64-byte aligned"):
        binding.address("x", x[1:], dummy=4096)
    with pytest.raises(BackendError, match="not contiguous"):
        binding.address("x", torch.zeros(4, 4).t(), dummy=4096)
    moved = binding.aligned(x[1:])
    assert moved.data_ptr() != x[1:].data_ptr() and torch.equal(moved, x[1:])
    assert binding.aligned(x) is x
