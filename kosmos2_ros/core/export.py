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

Why one hand-written decoder module rather than tracing `Kosmos2TextModel`: tracing freezes the
Python branches in transformers' code (``cache_length > 0`` drops the image, ``seq_len > 1``
builds a causal mask, the sinusoidal table grows on demand). The wrapper below has no
branch on shapes: it always inserts image embeddings where ``image_mask`` is 1 (as
``inputs_embeds[mask] = image_embeds`` does), scales by ``embed_scale``, reads positions from a
precomputed table, and builds the causal + padding mask from ``attention_mask`` and the past
length. Tests prove it equal to transformers on the prefill, suffix-prefill and decode paths.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

#: Bumped whenever the graphs' structure or names change, so cached artifacts rebuild.
EXPORT_VERSION = "3"
OPSET = 17
VISION_FILE = "vision/vision.onnx"
DECODER_FILE = "decoder/decoder.onnx"
MANIFEST_FILE = "manifest.json"
#: Rows of the sinusoidal position table baked into the graph (transformers grows it on demand;
#: every row is independent of the table size, so a large fixed table is exact).
MIN_POSITION_ROWS = 4096 + 8
#: Additive mask value: finite in fp16, and exp() of it underflows to exactly 0 in fp16 and fp32.
MASK_VALUE = -65504.0

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
    if manifest.get("export_version") != EXPORT_VERSION:
        return None
    if not all((Path(out_dir) / manifest["files"][g]).is_file() for g in ("vision", "decoder")):
        return None
    return manifest


# -- the modules that get traced -------------------------------------------------------------------
def _modules():
    """torch modules are defined lazily so importing this file does not import torch."""
    import torch
    from torch import nn

    class VisionGraph(nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model.get_image_features(pixel_values, return_dict=True).pooler_output

    class DecoderGraph(nn.Module):
        """Kosmos2TextForCausalLM with explicit positions, masks and KV tensors."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            causal_lm = model.text_model
            text = causal_lm.model
            cfg = causal_lm.config
            self.embed_tokens = text.embed_tokens
            self.layers = text.layers
            self.layer_norm = text.layer_norm
            self.lm_head = causal_lm.lm_head
            self.embed_scale = float(text.embed_scale)
            self.num_heads = int(cfg.attention_heads)
            self.head_dim = int(cfg.embed_dim) // self.num_heads
            rows = max(int(text.embed_positions.weights.shape[0]), MIN_POSITION_ROWS)
            table = text.embed_positions.get_embedding(rows, int(cfg.embed_dim), cfg.pad_token_id)
            self.register_buffer("position_table", table.to(text.embed_positions.weights.dtype), persistent=False)

        def forward(self, input_ids, image_embeds, image_mask, position_ids, attention_mask, *past):
            bsz, seq = input_ids.shape
            tok = self.embed_tokens(input_ids)
            # inputs_embeds[image_mask] = image_embeds, in order, without data-dependent shapes.
            img = image_embeds.to(tok.dtype).expand(bsz, -1, -1)
            index = (torch.cumsum(image_mask, dim=1) - 1).clamp(min=0)
            picked = torch.gather(img, 1, index.unsqueeze(-1).expand(-1, -1, img.shape[-1]))
            hidden = torch.where(image_mask.unsqueeze(-1) > 0, picked, tok) * self.embed_scale
            hidden = hidden + nn.functional.embedding(position_ids, self.position_table).to(hidden.dtype)

            past_len = attention_mask.shape[1] - seq
            key_pos = torch.arange(attention_mask.shape[1], device=input_ids.device)
            query_pos = torch.arange(seq, device=input_ids.device) + past_len
            allowed = (key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)).unsqueeze(0).unsqueeze(0)
            allowed = allowed & (attention_mask > 0).unsqueeze(1).unsqueeze(2)
            zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
            bias = torch.where(allowed, zero, torch.full((), MASK_VALUE, dtype=hidden.dtype, device=hidden.device))

            presents = []
            for i, layer in enumerate(self.layers):
                attn = layer.self_attn
                residual = hidden
                h = layer.self_attn_layer_norm(hidden)
                q = attn.q_proj(h).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
                k = attn.k_proj(h).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
                v = attn.v_proj(h).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
                presents += [k, v]
                k = torch.cat([past[2 * i], k], dim=2)
                v = torch.cat([past[2 * i + 1], v], dim=2)
                w = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling + bias
                w = torch.softmax(w, dim=-1)
                a = torch.matmul(w, v).transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
                if attn.inner_attn_ln is not None:
                    a = attn.inner_attn_ln(a)
                hidden = residual + attn.out_proj(a)
                residual = hidden
                hidden = residual + layer.ffn(layer.final_layer_norm(hidden))
            hidden = self.layer_norm(hidden[:, -1])
            logits = self.lm_head(hidden).float()
            return (logits, *presents)

    return VisionGraph, DecoderGraph


def load_for_export(model_dir: str, allow_pickle: bool = False) -> Any:
    import torch
    from transformers import Kosmos2ForConditionalGeneration

    model = Kosmos2ForConditionalGeneration.from_pretrained(
        os.path.expanduser(model_dir), dtype=torch.float32, attn_implementation="eager",
        use_safetensors=None if allow_pickle else True, trust_remote_code=False)
    return model.eval()


def decoder_module(model: Any) -> Any:
    """The traced decoder as a torch module (tests compare it with transformers directly)."""
    return _modules()[1](model).eval()


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
                          dynamo=False)


def _consolidate(path: Path) -> None:
    """Keep small graphs in one file; large ones keep the exporter's external weight files.

    Each graph has its own folder, so external tensor files of two graphs never collide.
    """
    if any(f != path for f in path.parent.iterdir()):
        return   # > 2 GB: the exporter already wrote weights beside the graph; loading all would double memory
    import onnx

    onnx.checker.check_model(str(path))


def export_model(model_dir: str, out_dir: Path, model: Any = None, allow_pickle: bool = False,
                 log: Any = None) -> dict:
    """Export vision and decoder graphs into `out_dir`; returns (and writes) the manifest."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if model is None:
        model = load_for_export(model_dir, allow_pickle)
        restore: List[Tuple[Any, Any]] = []
    else:  # a caller's model: trace the eager attention, then give its setting back
        configs = (model.config, model.config.text_config, model.config.vision_config)
        restore = [(c, c._attn_implementation) for c in configs]
        for c in configs:
            c._attn_implementation = "eager"
    try:
        return _export_all(model, model_dir, out_dir, tmp, log, t0)
    finally:
        for c, impl in restore:
            c._attn_implementation = impl


def _export_all(model: Any, model_dir: str, out_dir: Path, tmp: Path, log: Any, t0: float) -> dict:
    import torch

    vision_graph, decoder_graph = _modules()
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    size = int(vcfg.image_size)
    n_img = int(model.config.latent_query_num)
    dim, layers, heads = int(tcfg.embed_dim), int(tcfg.layers), int(tcfg.attention_heads)
    hd = dim // heads
    pixel = torch.zeros(1, 3, size, size)
    _export(vision_graph(model).eval(), (pixel,), tmp / VISION_FILE, ["pixel_values"], ["image_embeds"],
            {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}})
    _consolidate(tmp / VISION_FILE)
    if log:
        log(f"exported {VISION_FILE} in {time.perf_counter() - t0:.1f} s")
    # Trace with past > 0 and seq > 1 so no size is 0 or 1 at trace time (nothing specialises on it).
    bsz, seq, past = 2, 3, 2
    ids = torch.full((bsz, seq), 5, dtype=torch.long)
    img_mask = torch.zeros(bsz, seq, dtype=torch.long)
    pos = torch.arange(seq).expand(bsz, -1) + past + 2
    att = torch.ones(bsz, past + seq, dtype=torch.long)
    kv = [torch.zeros(bsz, heads, past, hd) for _ in range(2 * layers)]
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
    _export(decoder_graph(model).eval(), (ids, torch.zeros(1, n_img, dim), img_mask, pos, att, *kv),
            tmp / DECODER_FILE, ins, outs, axes)
    _consolidate(tmp / DECODER_FILE)
    if log:
        log(f"exported {DECODER_FILE} in {time.perf_counter() - t1:.1f} s")
    manifest = {
        "export_version": EXPORT_VERSION, "opset": OPSET, "model_dir": str(model_dir),
        "files": {"vision": VISION_FILE, "decoder": DECODER_FILE},
        "image_size": size, "image_tokens": n_img, "embed_dim": dim, "layers": layers, "heads": heads, "head_dim": hd,
        "vocab_size": int(tcfg.vocab_size), "pad_token_id": int(tcfg.pad_token_id if tcfg.pad_token_id is not None else 1),
        "max_positions": int(MIN_POSITION_ROWS), "torch": torch.__version__,
        "inputs": {"vision": ["pixel_values"], "decoder": ins}, "outputs": {"vision": ["image_embeds"], "decoder": outs},
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    if out_dir.exists():
        import shutil
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return manifest


def ensure_exported(model_dir: str, artifacts_dir: str, allow_export: bool = True, model: Any = None,
                    allow_pickle: bool = False, log: Any = None) -> Tuple[Path, dict]:
    """The graphs for `model_dir` under `artifacts_dir`, exporting them first if missing."""
    out = onnx_dir(artifacts_dir, model_dir)
    manifest = read_manifest(out)
    if manifest is None:
        if not allow_export:
            raise ExportError(f"no ONNX graphs for {model_dir} in {out}; run kosmos2-build-engines "
                              "or allow building (build_engines: true)")
        manifest = export_model(model_dir, out, model=model, allow_pickle=allow_pickle, log=log)
    return out, manifest


def fp16_headroom(model: Any, pixel_values: Any, input_ids: Any, image_mask: Any) -> Dict[str, float]:
    """Largest |activation| of an fp32 forward over a prompt, against fp16's largest finite value.

    Checks the sqrt(embed_dim)-scaled image embeddings and every layer's residual stream and
    attention/FFN intermediates (TensorRT fp16 keeps these in half precision).
    """
    import torch

    peaks: Dict[str, float] = {}
    hooks = []

    def track(name: str):
        def hook(_m, _i, out):
            t = out[0] if isinstance(out, tuple) else out
            if torch.is_tensor(t):
                peaks[name] = max(peaks.get(name, 0.0), float(t.detach().abs().max()))
        return hook

    text = model.text_model.model
    for i, layer in enumerate(text.layers):
        hooks.append(layer.register_forward_hook(track(f"layer{i}.out")))
        hooks.append(layer.ffn.fc1.register_forward_hook(track(f"layer{i}.fc1")))
        hooks.append(layer.self_attn.out_proj.register_forward_hook(track(f"layer{i}.attn")))
    try:
        with torch.no_grad():
            embeds = model.get_image_features(pixel_values, return_dict=True).pooler_output
            peaks["image_embeds*scale"] = float(embeds.abs().max()) * float(text.embed_scale)
            model.text_model(input_ids=input_ids, image_embeds=embeds, image_embeds_position_mask=image_mask)
    finally:
        for h in hooks:
            h.remove()
    fp16_max = 65504.0
    worst = max(peaks.values())
    return {"max_abs": worst, "fp16_max": fp16_max, "headroom": fp16_max / max(worst, 1e-30),
            "worst_at": max(peaks, key=peaks.get), "image_embeds_scaled": peaks["image_embeds*scale"],
            "log2_headroom": math.log2(fp16_max / max(worst, 1e-30))}
