"""ONNX export of Kosmos-2: the graphs onnxruntime runs and TensorRT builds engines from.

Two graphs, with fixed names (``GRAPH_IO`` documents them; other code relies on them):

``vision.onnx``
    ``pixel_values`` float32 [batch, 3, H, W] -> ``image_embeds`` float32 [batch, 64, D].
    Vision encoder, post_layernorm, L2 normalisation and the image-to-text projection: what
    ``Kosmos2ForConditionalGeneration.get_image_features(...).pooler_output`` returns.

``decoder.onnx``
    One graph for prefill (with or without a past), suffix prefill and the decode step:

    ========================  ===========================  ===========================================
    input                     shape                        meaning
    ========================  ===========================  ===========================================
    ``input_ids``             int64 [batch, seq]           tokens to append
    ``image_embeds``          float [img_batch, img, D]    projected image embeddings (img_batch 1 or
                                                           batch); a [1, 1, D] zero tensor when
                                                           ``image_mask`` is all zero
    ``image_mask``            int64 [batch, seq]           1 where the next image embedding goes
    ``position_ids``          int64 [batch, seq]           `base.position_ids` (padding aware)
    ``attention_mask``        int64 [batch, past + seq]    1 = real token, 0 = padding / hole
    ``past_key_{i}``          float [batch, H, past, hd]   layer i keys (past may be 0)
    ``past_value_{i}``        float [batch, H, past, hd]
    ========================  ===========================  ===========================================

    outputs: ``logits`` float32 [batch, vocab] (last position only) and ``new_key_{i}`` /
    ``new_value_{i}`` [batch, H, seq, hd]: the appended tokens' keys and values only. The
    caller owns the cache memory (`backends.kv_cache`): a decode step reads a fixed-size
    arena and writes one column into it, so nothing of the past is copied per step.

Precision variants. TensorRT 11 builds strongly typed networks only (no precision builder
flags), so the precision of an fp16 / bf16 engine is the precision of its graph. Beside the
fp32 graphs, `<precision>/vision/vision.onnx` and `<precision>/decoder/decoder.onnx` carry the
types of `REDUCED_PRECISION` (matrix products reduced, what sums or accumulates in fp32; the
same input and output names, the KV tensors in the reduced type). They are traced from
`MixedVisionGraph` and `DecoderGraph(dtype=...)`, which in fp32 compute exactly what the fp32
graphs compute.

The traced modules are hand-written (`backends.modules`, which says why); tests prove them equal
to transformers on the prefill, suffix-prefill and decode paths.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ...defaults import DTYPE_NAMES, PRECISIONS, QUANTIZED_PRECISIONS
from ..base import Backend, position_ids
from ..kv_cache import KVCache
from ..modules import (  # noqa: F401 (re-exported)
    MASK_VALUE,
    MIN_POSITION_ROWS,
    _modules,
    decoder_module,
    image_features,
    load_kosmos2,
    torch_dtype,
    vision_module,
)
from .graph_files import has_external_data

#: Bumped whenever the graphs' structure or names change, so cached artifacts rebuild.
#: 4: fp16 / bf16 graph variants (strongly typed: precision lives in the graph).
#: 5: no CumSum (image positions counted by a matrix product) and no Gather at index -1 (the last
#: position is a Slice from the shape): both undefined or unsupported in TensorRT 10.3.
#: 6: attention reads the past KV without a Concat (scores over past and new keys joined before the softmax).
EXPORT_VERSION = "6"
#: Graph precisions (`defaults.PRECISIONS`): fp32 (the reference onnxruntime runs) and the reduced-precision
#: variants TensorRT builds its fp16 / bf16 engines from (exported on demand, under `<precision>/`).
#: ONNX / numpy element type names of each precision's compute dtype (and KV cache).
ONNX_TYPES = DTYPE_NAMES
#: What the fp16 / bf16 graphs compute in which type, and why (the README's precision table;
#: the peaks behind it come from `fp16_headroom`, which `kosmos2-build-engines` runs first).
REDUCED_PRECISION = (
    ("matrix products (q/k/v/out projections, FFN fc1/fc2, the ViT's layers, lm_head): weights and outputs",
     "reduced", "where the FLOPs and bytes are; their peaks (fp16_headroom's reduced_*) stay far inside fp16, and "
     "TensorRT's kernels accumulate in fp32"),
    ("attention scores q.k", "reduced, q scaled first",
     "scaling q by 1/sqrt(head_dim) before the product (exact for head_dim 64) keeps its magnitude small"),
    ("KV cache (past_*, new_*)", "reduced",
     "k and v leave their projections already rounded: fp32 storage adds nothing but twice the bytes a step reads"),
    ("LayerNorm statistics and outputs, softmax", "fp32, cast back after",
     "sums of squares over 2048 values and exp() lose range and digits in fp16"),
    ("residual streams (decoder, ViT) and the sqrt(D)-scaled image embeddings", "fp32",
     "the quantity that grows with depth and carries the largest activations (fp16_headroom's max_abs)"),
    ("patch embedding, post-layernorm, L2 normalisation, image-to-text projection", "fp32",
     "19 M parameters run once per frame, feeding the sqrt(D)-scaled image embeddings"),
    ("graph inputs and outputs: pixel_values, image_embeds, logits", "fp32",
     "one interface type for every backend; logits are compared and argmaxed in fp32"),
)
OPSET = 17
VISION_FILE = "vision/vision.onnx"
DECODER_FILE = "decoder/decoder.onnx"
MANIFEST_FILE = "manifest.json"

GRAPH_IO = {
    "vision": {"inputs": ["pixel_values"], "outputs": ["image_embeds"]},
    "decoder": {
        "inputs": ["input_ids", "image_embeds", "image_mask", "position_ids", "attention_mask",
                   "past_key_{i}", "past_value_{i}"],
        "outputs": ["logits", "new_key_{i}", "new_value_{i}"],
    },
}


class ExportError(RuntimeError):
    """Exporting the model to ONNX failed."""


# -- cache keys ----------------------------------------------------------------------------------
def model_files(model_dir: str) -> List[Path]:
    """The files that define the model's numbers: config and weights."""
    root = Path(os.path.expanduser(model_dir))
    files = [root / "config.json"] + sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin"))
    return [f for f in files if f.is_file()]


def model_hash(model_dir: str, memo_dir: Optional[str] = None) -> str:
    """sha256 over config.json and the weight files (names and contents), 16 hex digits.

    Hashing gigabytes takes seconds, so results are memoised in `memo_dir/hashes.json` under
    each file's (path, size, mtime).
    """
    memo: Dict[str, str] = {}
    memo_path = Path(os.path.expanduser(memo_dir)) / "hashes.json" if memo_dir else None
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
    total = hashlib.sha256()
    changed = False
    files = model_files(model_dir)
    if not files:
        raise ExportError(f"{model_dir} has no config.json or weights to export")
    for f in files:
        st = f.stat()
        k = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = memo.get(k)
        if digest is None:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            digest = memo[k] = h.hexdigest()
            changed = True
        total.update(f.name.encode() + b"\0" + digest.encode())
    if changed and memo_path is not None:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            memo_path.write_text(json.dumps(memo, indent=0))
        except OSError:
            pass
    return total.hexdigest()[:16]


def onnx_dir(artifacts_dir: str, model_dir: str) -> Path:
    """Where a model's graphs live: <artifacts>/onnx/<model hash>-v<export version>/."""
    root = Path(os.path.expanduser(artifacts_dir))
    return root / "onnx" / f"{model_hash(model_dir, str(root))}-v{EXPORT_VERSION}"


def read_manifest(out_dir: Path) -> Optional[dict]:
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("export_version") != EXPORT_VERSION or "fp32" not in manifest.get("variants", {}):
        return None
    variants = {p: v for p, v in manifest["variants"].items()
                if all((Path(out_dir) / f).is_file() for f in v["files"].values())}
    if "fp32" not in variants:
        return None
    return dict(manifest, variants=variants)   # a variant whose files went missing is exported again


def load_for_export(model_dir: str, allow_pickle: bool = False) -> Any:
    import torch

    return load_kosmos2(os.path.expanduser(model_dir), dtype=torch.float32, attn_implementation="eager",
                        use_safetensors=None if allow_pickle else True, trust_remote_code=False)


def decoder_names(num_layers: int) -> Tuple[List[str], List[str]]:
    ins = ["input_ids", "image_embeds", "image_mask", "position_ids", "attention_mask"]
    outs = ["logits"]
    for i in range(num_layers):
        ins += [f"past_key_{i}", f"past_value_{i}"]
        outs += [f"new_key_{i}", f"new_value_{i}"]
    return ins, outs


def _export(module: Any, args: tuple, path: Path, inputs: List[str], outputs: List[str],
            axes: Dict[str, Dict[int, str]]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        # The TorchScript exporter: no extra dependency, and hand-written modules trace cleanly.
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True,
                          **torchscript_exporter(torch.onnx.export))


def torchscript_exporter(export: Any) -> Dict[str, Any]:
    """`dynamo=False` where torch.onnx.export has the flag (torch 2.4+, where later releases default to dynamo);
    torch 2.3 (JetPack 6.0) has only the TorchScript exporter and no such argument."""
    return {"dynamo": False} if "dynamo" in inspect.signature(export).parameters else {}


def _consolidate(path: Path) -> None:
    """Keep small graphs in one file; large ones keep the exporter's external weight files.

    Each graph has its own folder, so external tensor files of two graphs never collide.
    """
    if has_external_data(path):
        return   # > 2 GB: the exporter already wrote weights beside the graph; loading all would double memory
    import onnx

    onnx.checker.check_model(str(path))


class _EagerAttention:
    """Trace a caller's model with eager attention, then give its setting back."""

    def __init__(self, model: Any) -> None:
        self.configs = (model.config, model.config.text_config, model.config.vision_config)
        self.saved = [c._attn_implementation for c in self.configs]

    def __enter__(self) -> None:
        for c in self.configs:
            c._attn_implementation = "eager"

    def __exit__(self, *exc: Any) -> None:
        for c, impl in zip(self.configs, self.saved):
            c._attn_implementation = impl


def export_model(model_dir: str, out_dir: Path, model: Any = None, allow_pickle: bool = False,
                 log: Any = None) -> dict:
    """Export the fp32 vision and decoder graphs into `out_dir`; returns (and writes) the manifest."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else load_for_export(model_dir, allow_pickle)
    with _EagerAttention(model):
        variant = _export_graphs(model, tmp, "fp32", log)
    manifest = _describe(model, model_dir)
    manifest["files"] = dict(variant["files"])
    manifest["variants"] = {"fp32": variant}
    _write_manifest(tmp, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return manifest


def export_variant(model_dir: str, out_dir: Path, precision: str, model: Any = None,
                   allow_pickle: bool = False, log: Any = None) -> dict:
    """Add the `precision` graphs (fp16 / bf16) beside the fp32 ones in `out_dir`; returns the manifest."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise ExportError(f"no fp32 graphs in {out_dir} to add {precision} graphs to")
    model = model if model is not None else load_for_export(model_dir, allow_pickle)
    tmp = out_dir / f"{precision}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    with _EagerAttention(model):
        variant = _export_graphs(model, tmp, precision, log)
    final = out_dir / precision
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    variant["files"] = {g: f"{precision}/{f}" for g, f in variant["files"].items()}
    manifest = dict(manifest, variants=dict(manifest.get("variants", {}), **{precision: variant}))
    _write_manifest(out_dir, manifest)
    return manifest


def graph_files(manifest: dict, precision: str = "fp32") -> Dict[str, str]:
    """{"vision": path, "decoder": path} of one precision's graphs, relative to the graph directory."""
    return dict(manifest["variants"][precision]["files"])


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = Path(out_dir) / f"{MANIFEST_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, Path(out_dir) / MANIFEST_FILE)


def _describe(model: Any, model_dir: str) -> dict:
    """The manifest's description of the model: what backends and engine profiles need."""
    import torch

    vcfg, tcfg = model.config.vision_config, model.config.text_config
    dim, layers, heads = int(tcfg.embed_dim), int(tcfg.layers), int(tcfg.attention_heads)
    ins, outs = decoder_names(layers)
    return {
        "export_version": EXPORT_VERSION, "opset": OPSET, "model_dir": str(model_dir),
        "image_size": int(vcfg.image_size), "image_tokens": int(model.config.latent_query_num), "embed_dim": dim,
        "layers": layers, "heads": heads, "head_dim": dim // heads, "vocab_size": int(tcfg.vocab_size),
        "pad_token_id": int(tcfg.pad_token_id if tcfg.pad_token_id is not None else 1),
        "max_positions": int(MIN_POSITION_ROWS), "torch": torch.__version__,
        "inputs": {"vision": ["pixel_values"], "decoder": ins}, "outputs": {"vision": ["image_embeds"], "decoder": outs},
    }


def _export_graphs(model: Any, root: Path, precision: str, log: Any) -> dict:
    """Trace vision.onnx and decoder.onnx of one precision under `root`; returns files and I/O dtypes."""
    import torch

    vision_graph, decoder_graph, mixed_vision_graph = _modules()
    dtype = torch_dtype(precision)
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    size = int(vcfg.image_size)
    n_img = int(model.config.latent_query_num)
    dim, layers, heads = int(tcfg.embed_dim), int(tcfg.layers), int(tcfg.attention_heads)
    hd = dim // heads
    t0 = time.perf_counter()
    vision = vision_graph(model) if precision == "fp32" else mixed_vision_graph(model, dtype)
    _export(vision.eval(), (torch.zeros(1, 3, size, size),), root / VISION_FILE, ["pixel_values"],
            ["image_embeds"], {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}})
    del vision
    _consolidate(root / VISION_FILE)
    if log:
        log(f"exported {precision} {VISION_FILE} in {time.perf_counter() - t0:.1f} s")
    # Trace with past > 0 and seq > 1 so no size is 0 or 1 at trace time (nothing specialises on it).
    bsz, seq, past = 2, 3, 2
    ids = torch.full((bsz, seq), 5, dtype=torch.long)
    img_mask = torch.zeros(bsz, seq, dtype=torch.long)
    pos = torch.arange(seq).expand(bsz, -1) + past + 2
    att = torch.ones(bsz, past + seq, dtype=torch.long)
    kv = [torch.zeros(bsz, heads, past, hd, dtype=dtype) for _ in range(2 * layers)]
    ins, outs = decoder_names(layers)
    axes: Dict[str, Dict[int, str]] = {
        "input_ids": {0: "batch", 1: "seq"}, "image_embeds": {0: "img_batch", 1: "img"},
        "image_mask": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch"},
    }
    for name in ins[5:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in outs[1:]:
        axes[name] = {0: "batch", 2: "seq"}
    t1 = time.perf_counter()
    decoder = decoder_graph(model, None if precision == "fp32" else dtype)
    _export(decoder.eval(), (ids, torch.zeros(1, n_img, dim), img_mask, pos, att, *kv),
            root / DECODER_FILE, ins, outs, axes)
    del decoder
    _consolidate(root / DECODER_FILE)
    if log:
        log(f"exported {precision} {DECODER_FILE} in {time.perf_counter() - t1:.1f} s")
    kv_type = ONNX_TYPES[precision]
    return {"files": {"vision": VISION_FILE, "decoder": DECODER_FILE},
            "dtypes": {"pixel_values": "float32", "image_embeds": "float32", "logits": "float32", "kv": kv_type}}


def ensure_exported(model_dir: str, artifacts_dir: str, allow_export: bool = True, model: Any = None,
                    allow_pickle: bool = False, log: Any = None, precision: str = "fp32") -> Tuple[Path, dict]:
    """The graphs for `model_dir` under `artifacts_dir` (fp32, and `precision`'s), exporting what is
    missing first: fp16 / bf16 are traced from the model (loaded at most once), int8 / int4 are
    quantized from the fp32 graphs (`quantize`; again when the recipe changed). One process builds at a
    time (`build_lock`); the others wait and use its graphs."""
    from . import quantize

    if precision not in PRECISIONS + QUANTIZED_PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS + QUANTIZED_PRECISIONS}, got {precision!r}")
    out = onnx_dir(artifacts_dir, model_dir)

    def cached() -> Tuple[Optional[dict], bool]:
        manifest = read_manifest(out)
        variant = (manifest or {}).get("variants", {}).get(precision)
        return manifest, variant is not None and (precision not in QUANTIZED_PRECISIONS
                                                  or quantize.is_current(variant, precision))

    manifest, ready = cached()
    if ready:
        return out, manifest
    if not allow_export:
        raise ExportError(f"no {precision} ONNX graphs for {model_dir} in {out}; run kosmos2-build-engines "
                          "or allow building (build_engines: true)")
    with build_lock(out, log):
        manifest, ready = cached()       # another process may have made them while this one waited
        if ready:
            return out, manifest
        return out, _build(model_dir, out, manifest, precision, model, allow_pickle, log)


@contextlib.contextmanager
def build_lock(out: Path, log: Any = None, what: str = "graphs") -> Iterator[None]:
    """One process at a time makes or replaces the `what` in `out` (two nodes started together would
    otherwise both export or quantize, one deleting what the other was loading, and the manifest would
    keep only one of their variants). An advisory lock on a file beside `out`, released by the kernel
    when the holder exits, so a killed build never leaves it held. A process that must wait says so
    (to `log`, else stderr): quantizing or an engine build can take minutes."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            (log or _to_stderr)(f"waiting for another process building the {what} in {out}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _build(model_dir: str, out: Path, manifest: Optional[dict], precision: str, model: Any, allow_pickle: bool,
           log: Any) -> dict:
    """Export (and quantize) what `precision` needs into `out`; returns the manifest."""
    from . import quantize

    if manifest is None:
        model = model if model is not None else load_for_export(model_dir, allow_pickle)
        manifest = export_model(model_dir, out, model=model, log=log)
    if precision in QUANTIZED_PRECISIONS:
        variant = quantize.quantize_variant(out, manifest, precision, log)
        manifest = dict(manifest, variants=dict(manifest["variants"], **{precision: variant}))
        _write_manifest(out, manifest)
    elif precision not in manifest["variants"]:
        model = model if model is not None else load_for_export(model_dir, allow_pickle)
        manifest = export_variant(model_dir, out, precision, model=model, log=log)
    return manifest


#: fp16's largest finite value.
FP16_MAX = 65504.0


def fp16_headroom(model: Any, pixel_values: Any, input_ids: Any, image_mask: Any) -> Dict[str, Any]:
    """Largest |activation| of an fp32 forward over a prompt, against fp16's largest finite value.

    Two groups, as the fp16 graphs type them (REDUCED_PRECISION): ``reduced_*`` covers the
    tensors the fp16 graphs keep in fp16 (every matrix product's output: q/k/v, which are also
    the fp16 KV cache, attention and FFN outputs, fc1, the lm_head logits, in the text decoder
    and the ViT); the rest (``max_abs`` over everything) adds the fp32 residual streams of both
    and the sqrt(embed_dim)-scaled image embeddings. `reduced_headroom` decides whether fp16
    is safe; `headroom` says how far an all-fp16 graph would have been from overflow.
    """
    import torch

    peaks: Dict[str, float] = {}
    reduced: set = set()
    hooks = []

    def track(name: str, module: Any, low: bool) -> None:
        def hook(_m, _i, out):
            t = out[0] if isinstance(out, tuple) else out
            if torch.is_tensor(t):
                peaks[name] = max(peaks.get(name, 0.0), float(t.detach().abs().max()))
        if low:
            reduced.add(name)
        hooks.append(module.register_forward_hook(hook))

    text = model.text_model.model
    for i, layer in enumerate(text.layers):
        track(f"layer{i}.out", layer, False)
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            track(f"layer{i}.{'attn' if name == 'out_proj' else name}", getattr(layer.self_attn, name), True)
        track(f"layer{i}.fc1", layer.ffn.fc1, True)
        track(f"layer{i}.fc2", layer.ffn.fc2, True)
    track("lm_head", model.text_model.lm_head, True)
    for i, layer in enumerate(model.vision_model.model.encoder.layers):
        track(f"vision{i}.out", layer, False)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            track(f"vision{i}.{name}", getattr(layer.self_attn, name), True)
        track(f"vision{i}.fc1", layer.mlp.fc1, True)
        track(f"vision{i}.fc2", layer.mlp.fc2, True)
    try:
        with torch.no_grad():
            embeds = image_features(model, pixel_values)
            peaks["image_embeds*scale"] = float(embeds.abs().max()) * float(text.embed_scale)
            model.text_model(input_ids=input_ids, image_embeds=embeds, image_embeds_position_mask=image_mask)
    finally:
        for h in hooks:
            h.remove()
    worst = max(peaks.values())
    low = {k: v for k, v in peaks.items() if k in reduced}
    low_worst = max(low.values())
    return {"max_abs": worst, "fp16_max": FP16_MAX, "headroom": FP16_MAX / max(worst, 1e-30),
            "worst_at": max(peaks, key=peaks.get), "image_embeds_scaled": peaks["image_embeds*scale"],
            "log2_headroom": math.log2(FP16_MAX / max(worst, 1e-30)),
            "reduced_max_abs": low_worst, "reduced_headroom": FP16_MAX / max(low_worst, 1e-30),
            "reduced_worst_at": max(low, key=low.get),
            "kv_max_abs": max(v for k, v in low.items() if k.startswith("layer") and k[-6:] in ("k_proj", "v_proj"))}


# -- checking the reduced-precision graphs on the CPU ----------------------------------------------
class GraphBackend(Backend):
    """One precision's exported graphs behind the `Backend` interface, keys/values concatenated on
    the host: slow and simple, for checking fp16 / bf16 graphs against fp32 where no GPU is.

    onnxruntime runs the fp32 and fp16 graphs (its CPU provider computes fp16 nodes it has no
    fp16 kernel for in fp32 between fp16 tensors: the rounding at every tensor the graph types
    fp16 is kept, as TensorRT's fp16 kernels with fp32 accumulation keep it). Its CPU provider
    has no bfloat16 MatMul kernel, so bf16 runs the torch modules the bf16 graphs are traced
    from, in torch's bfloat16 on the CPU (`runs_on` says which).
    """

    name = "graphs"
    can_truncate = False

    def __init__(self, model_dir: str, artifacts_dir: str, precision: str = "fp32", model: Any = None) -> None:
        self.precision = precision
        self.graph_dir, m = ensure_exported(model_dir, artifacts_dir, model=model, precision=precision)
        self.manifest = m
        self.vocab_size, self.pad_token_id = int(m["vocab_size"]), int(m["pad_token_id"])
        self._inputs = list(m["inputs"]["decoder"])
        self._shape = (1, int(m["heads"]), 0, int(m["head_dim"]))
        self._no_image = np.zeros((1, 1, int(m["embed_dim"])), dtype=np.float32)
        if precision == "bf16":
            self._torch_modules(model if model is not None else load_for_export(model_dir))
        else:
            self._sessions(graph_files(m, precision), np.dtype(m["variants"][precision]["dtypes"]["kv"]))

    def _sessions(self, files: Dict[str, str], kv_dtype: Any) -> None:
        import onnxruntime as ort

        self.runs_on = "onnxruntime CPU"
        vision, decoder = (ort.InferenceSession(str(self.graph_dir / files[g]), providers=["CPUExecutionProvider"])
                           for g in ("vision", "decoder"))
        self._vision = lambda pv: vision.run(None, {"pixel_values": pv})[0]
        self._decoder = lambda feeds: decoder.run(None, feeds)
        self._zeros = lambda: np.zeros(self._shape, dtype=kv_dtype)
        self._cat = lambda a, b: np.concatenate([a, b], axis=2)

    def _torch_modules(self, model: Any) -> None:
        import torch

        self.runs_on = "torch CPU bfloat16 (onnxruntime's CPU provider has no bfloat16 MatMul)"
        vision, decoder = vision_module(model, "bf16"), decoder_module(model, "bf16")

        def run_decoder(feeds: dict) -> list:
            args = [torch.from_numpy(feeds[n]) if not torch.is_tensor(feeds[n]) else feeds[n] for n in self._inputs]
            with torch.no_grad():
                out = decoder(*args)
            return [out[0].numpy(), *out[1:]]

        def run_vision(pv: Any) -> Any:
            with torch.no_grad():
                return vision(torch.from_numpy(pv)).numpy()

        self._vision, self._decoder = run_vision, run_decoder
        self._zeros = lambda: torch.zeros(self._shape, dtype=torch.bfloat16)
        self._cat = lambda a, b: torch.cat([a, b], dim=2)

    def encode_image(self, pixel_values: Any) -> Any:
        return self._vision(np.ascontiguousarray(pixel_values, dtype=np.float32))

    def prefill(self, image_embeds: Any, input_ids: Any, image_mask: Any, cache: Any = None) -> Tuple[Any, Any]:
        past = cache.length if cache is not None else 0
        kv = cache.kv if cache is not None else [self._zeros() for _ in self._inputs[5:]]
        if cache is not None or image_embeds is None:    # as transformers: no image after a past
            image_embeds, image_mask = self._no_image, [0] * len(input_ids)
        row = lambda a: np.asarray([a], dtype=np.int64)   # noqa: E731
        feeds = {"input_ids": row(input_ids), "image_embeds": np.ascontiguousarray(image_embeds, dtype=np.float32),
                 "image_mask": row(image_mask), "position_ids": position_ids(input_ids, past, self.pad_token_id)[None],
                 "attention_mask": np.ones((1, past + len(input_ids)), dtype=np.int64),
                 **dict(zip(self._inputs[5:], kv))}
        out = self._decoder(feeds)
        return out[0][0], KVCache(past + len(input_ids), [self._cat(a, b) for a, b in zip(kv, out[1:])])

    def decode(self, cache: Any, token_id: int) -> Tuple[Any, Any]:
        return self.prefill(None, [int(token_id)], [0], cache)

    def fork(self, cache: Any) -> Any:
        return cache          # every step makes new arrays: a cache is never written in place

    def close(self) -> None:
        self._vision = self._decoder = None


def forced_logits(backend: Any, image_embeds: Any, input_ids: Any, image_mask: Any,
                  tokens: List[int]) -> List[np.ndarray]:
    """Logits after the prompt and after each of `tokens`, teacher-forced (fp32 arrays)."""
    logits, cache = backend.prefill(image_embeds, input_ids, image_mask)
    out = [np.asarray(logits, dtype=np.float32)]
    for tok in tokens:
        logits, cache = backend.decode(cache, tok)
        out.append(np.asarray(logits, dtype=np.float32))
    return out


def compare_logits(ref: List[np.ndarray], other: List[np.ndarray]) -> Tuple[float, List[float]]:
    """(the largest |dlogits| over all positions, and at each position where `other`'s argmax
    differs from `ref`'s, `ref`'s logit margin between the two: a near-tie when it is within
    the measured error)."""
    diff, margins = 0.0, []
    for la, lb in zip(ref, other):
        diff = max(diff, float(np.abs(la - lb).max()))
        a, b = int(np.argmax(la)), int(np.argmax(lb))
        if a != b:
            margins.append(float(la[a] - la[b]))
    return diff, margins


def forced_margins(ref: Any, other: Any, e_ref: Any, e_other: Any, input_ids: Any, image_mask: Any,
                   tokens: List[int]) -> Tuple[float, List[float]]:
    """`compare_logits` of two backends teacher-forced on `ref`'s greedy `tokens`."""
    return compare_logits(forced_logits(ref, e_ref, input_ids, image_mask, tokens),
                          forced_logits(other, e_other, input_ids, image_mask, tokens))


def first_divergence(ref_tokens: List[int], other_tokens: List[int], ref_logits: List[np.ndarray]) -> Optional[float]:
    """None when the token lists are equal; else `ref`'s logit margin, at the first step they
    differ, between its own token and the other's (`ref_logits[i]`: ref's logits before token i)."""
    for i, (a, b) in enumerate(zip(ref_tokens, other_tokens)):
        if a != b:
            return float(ref_logits[i][a] - ref_logits[i][b])
    return None if len(ref_tokens) == len(other_tokens) else 0.0


#: A differing greedy token is a near-tie when the reference's top-two margin there is within
#: this many times the largest logit difference measured (2x is the bound: each of the two
#: logits may move by the difference; 4x leaves room for what one run did not see).
NEAR_TIE_FACTOR = 4.0


def precision_verdict(same: bool, margins: List[float], diff: float, precision: str) -> Tuple[str, bool]:
    """(text, ok): exact equality, or for fp16/bf16 differences only at near-ties of the reference."""
    if same and not margins:
        return "yes", True
    tol = NEAR_TIE_FACTOR * diff
    if precision != "fp32" and margins and max(margins) <= tol:
        return f"near-ties only (margins <= {max(margins):.1e}, {NEAR_TIE_FACTOR:g} x max dlogits = {tol:.1e})", True
    return f"NO (margins at differing steps: {', '.join(f'{m:.1e}' for m in margins) or 'none'})", False
