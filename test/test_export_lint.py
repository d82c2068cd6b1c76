"""Lint of the exported graphs for what TensorRT's ONNX parser takes (runs without TensorRT).

Every node of the fp32, fp16 and bf16 vision and decoder graphs must be an operator onnx-tensorrt
supports at TensorRT 10.3 (JetPack 6), with the element types and constant inputs its table asks
for; no CumSum (no TensorRT 10.3 layer: a loop); no Gather at a negative constant index (undefined
on a dynamic axis in TensorRT: it may read zeros). The facts are data with their source:
`test/data/onnx_tensorrt_ops.json`. And one rule of our own: no Concat takes a past key/value (directly
or through a Cast/Identity/Reshape), since that copies the whole KV cache every layer every step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, shape_inference

from kosmos2_ros.core.backends.onnx import export

OPS = json.loads((Path(__file__).parent / "data" / "onnx_tensorrt_ops.json").read_text())
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def lint(model: onnx.ModelProto) -> List[str]:
    """What in `model` TensorRT 10.3's ONNX parser would refuse or compute wrongly, one line each."""
    graph = shape_inference.infer_shapes(model).graph
    types: Dict[str, int] = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output,
                                                                           *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    constants.update({t.name: numpy_helper.to_array(t) for t in graph.initializer})
    found = []
    past = {i.name: i.name for i in graph.input if i.name.startswith("past_")}   # tensor -> the past input it is
    for node in graph.node:
        where = f"{node.op_type} {node.name}"
        if node.op_type in ("Cast", "Identity", "Reshape") and node.input and node.input[0] in past:
            past[node.output[0]] = past[node.input[0]]
        joined = [past[name] for name in node.input if name in past]
        if node.op_type == "Concat" and joined:
            found.append(f"{where}: concatenates the past key/value {joined[0]} (a copy of the whole cache every step)")
        if node.op_type not in OPS["supported_10_3"]:
            found.append(f"{where}: not an operator onnx-tensorrt supports at 10.3")
        if node.op_type == "CumSum":
            found.append(f"{where}: {OPS['avoided']['CumSum']}")
        if node.op_type in OPS["float_only"]["ops"] and types.get(node.input[0]) not in FLOATS:
            found.append(f"{where}: input type {types.get(node.input[0])} (onnx-tensorrt: float types only)")
        if node.op_type in OPS["constant_axes"]["ops"] and len(node.input) > 1 and node.input[1] \
                and node.input[1] not in constants:
            found.append(f"{where}: its axes are computed (onnx-tensorrt: an initializer)")
        if node.op_type == "Gather" and node.input[1] in constants and (np.asarray(constants[node.input[1]]) < 0).any():
            found.append(f"{where}: negative constant index ({OPS['avoided']['Gather with a negative constant index']})")
    return found


@pytest.fixture(scope="module")
def graphs(tiny_model_dir, tmp_path_factory):
    art = str(tmp_path_factory.mktemp("lint_artifacts"))
    out = None
    for precision in ("fp32", "fp16", "bf16"):
        out, manifest = export.ensure_exported(str(tiny_model_dir), art, precision=precision)
    return out, manifest


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("graph", ["vision", "decoder"])
def test_exported_graphs_pass_the_tensorrt_lint(graphs, precision, graph):
    out, manifest = graphs
    model = onnx.load(str(out / export.graph_files(manifest, precision)[graph]))
    assert lint(model) == []
    assert model.graph.node, "an empty graph would pass any lint"


def test_the_lint_catches_what_it_is_for():
    """A CumSum over int64, a Gather at -1, an unsupported operator and a Concat of the past are each reported."""
    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.INT64, [2, "seq"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.INT64, None)
    nodes = [helper.make_node("Constant", [], ["axis"], value=numpy_helper.from_array(np.array(1, dtype=np.int64))),
             helper.make_node("CumSum", ["x", "axis"], ["c"], name="count"),
             helper.make_node("Constant", [], ["last"], value=numpy_helper.from_array(np.array(-1, dtype=np.int64))),
             helper.make_node("Gather", ["c", "last"], ["g"], name="pick", axis=1),
             helper.make_node("StringNormalizer", ["g"], ["y"], name="odd")]
    past = helper.make_tensor_value_info("past_key_0", onnx.TensorProto.FLOAT, [1, 4, "past", 8])
    new = helper.make_tensor_value_info("new_key_0", onnx.TensorProto.FLOAT, [1, 4, "seq", 8])
    nodes += [helper.make_node("Identity", ["past_key_0"], ["p"], name="alias"),
              helper.make_node("Concat", ["p", "new_key_0"], ["k"], name="join", axis=2)]
    model = helper.make_model(helper.make_graph(nodes, "bad", [x, past, new], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    found = lint(model)
    assert any(f.startswith("Concat join: concatenates the past key/value past_key_0") for f in found)
    assert any(f.startswith("CumSum count: TensorRT 10.3 has no cumulative layer") for f in found)
    assert any(f.startswith("CumSum count: input type 7") for f in found)
    assert any(f.startswith("Gather pick: negative constant index") for f in found)
    assert any(f.startswith("StringNormalizer odd: not an operator") for f in found)
