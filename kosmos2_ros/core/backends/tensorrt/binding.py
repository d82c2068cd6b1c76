"""Binding torch tensors to a TensorRT execution context, with the rules TensorRT states checked.

From NvInferRuntime.h (`IExecutionContext::setTensorAddress`, TensorRT 10.3 and 11.1): before
`enqueueV3` every input needs a non-null address, and "the pointer must have at least 256-byte
alignment". An empty CUDA tensor's `data_ptr()` is 0, so empty tensors (the past of a prefill
from scratch) are bound to a small dummy allocation, as TensorRT's own samples do
(samples/common/sampleInference.cpp). `set_input_shape` and `set_tensor_address` return False
on a refusal; both are checked, and each output buffer's shape is compared with the shape the
engine computes for it from the inputs, so a mismatch is an error here, not a write past a buffer.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..base import BackendError

#: Alignment TensorRT requires of every bound address.
ALIGNMENT = 256


def address(name: str, tensor: Any, dummy: int) -> int:
    """The address to bind for `tensor`: the dummy for an empty one; refused when misaligned or strided."""
    if tensor.numel() == 0:
        return int(dummy)
    if not tensor.is_contiguous():
        raise BackendError(f"tensor {name} {tuple(tensor.shape)} is not contiguous; TensorRT reads dense tensors")
    ptr = int(tensor.data_ptr())
    if ptr % ALIGNMENT:
        raise BackendError(f"tensor {name} is at address {ptr:#x}, not {ALIGNMENT}-byte aligned as TensorRT requires")
    return ptr


def aligned(tensor: Any) -> Any:
    """`tensor`, or a dense copy of it (a new allocation: aligned) where its address could not be bound."""
    if tensor.numel() and (not tensor.is_contiguous() or int(tensor.data_ptr()) % ALIGNMENT):
        import torch

        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def bind(ctx: Any, inputs: Mapping[str, Any], outputs: Mapping[str, Any], dummy: int) -> None:
    """Set every input's shape, then every tensor's address; check output shapes against the engine's."""
    for name, t in inputs.items():
        if not ctx.set_input_shape(name, tuple(t.shape)):
            raise BackendError(f"input {name} shape {tuple(t.shape)} is outside the engine's optimisation profile "
                               "(rebuild engines with larger limits: kosmos2-build-engines --max-batch/--max-context)")
    for name, t in list(inputs.items()) + list(outputs.items()):
        if not ctx.set_tensor_address(name, address(name, t, dummy)):
            raise BackendError(f"TensorRT refused the address of tensor {name}")
    for name, t in outputs.items():
        want = tuple(int(d) for d in ctx.get_tensor_shape(name))
        if want != tuple(t.shape):
            raise BackendError(f"engine output {name} has shape {want} for these inputs, its buffer {tuple(t.shape)}")
