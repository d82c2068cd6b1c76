"""The hand-written Kosmos-2 modules: traced into the ONNX graphs (`onnx.export`) and run as they
are by the torch backend's static path (`torch.static`).

Why hand-written rather than tracing `Kosmos2TextModel`: tracing freezes the Python branches in
transformers' code (``cache_length > 0`` drops the image, ``seq_len > 1`` builds a causal mask,
the sinusoidal table grows on demand). `DecoderGraph` has no branch on shapes: it always inserts
image embeddings where ``image_mask`` is 1 (as ``inputs_embeds[mask] = image_embeds`` does),
scales by ``embed_scale``, reads positions from a precomputed table, and builds the causal +
padding mask from ``attention_mask`` and the past length, so one module serves prefill, suffix
prefill and the decode step over a static arena. Tests prove it equal to transformers on each path.
torch is imported only when the modules are first built.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

#: Rows of the sinusoidal position table baked into the graph (transformers grows it on demand;
#: every row is independent of the table size, so a large fixed table is exact).
MIN_POSITION_ROWS = 4096 + 8
#: Additive mask value: finite in fp16, and exp() of it underflows to exactly 0 in fp16 and fp32.
MASK_VALUE = -65504.0


def _modules():
    """torch modules are defined lazily so importing this file does not import torch."""
    import torch
    from torch import nn

    class Precision(nn.Module):
        """Where the reduced-precision graphs keep fp32 (see REDUCED_PRECISION); identity in fp32.

        `lowp(linear)` is a matrix-product module in the compute dtype: a copy when the model is fp32 (the
        fp32 model is never modified), the module itself when the model was loaded in that dtype (no copy,
        and tied weights stay tied); `norm(ln, x)` runs a LayerNorm on fp32 statistics and hands back the
        compute dtype; `f32(x)` / `low(x)` cast into and out of the fp32 parts. `fp32_parameters()` are the
        parameters outside the `lowp` modules: what must be fp32 (a model loaded in the compute dtype has
        them in it until `torch.static` reads them again from the checkpoint).
        """

        def __init__(self, dtype: Any = None) -> None:
            super().__init__()
            self.dt = dtype or torch.float32
            self.reduced = self.dt != torch.float32
            self._lowp_ids: set = set()

        def lowp(self, module: Any) -> Any:
            if not self.reduced:
                return module
            if any(p.dtype != self.dt for p in module.parameters()):
                module = copy.deepcopy(module).to(self.dt)
            self._lowp_ids.update(id(p) for p in module.parameters())
            return module

        def fp32_parameters(self) -> list:
            return [p for p in self.parameters() if id(p) not in self._lowp_ids and p.is_floating_point()]

        def f32(self, x: torch.Tensor) -> torch.Tensor:
            return x.float() if self.reduced else x

        def low(self, x: torch.Tensor) -> torch.Tensor:
            return x.to(self.dt) if self.reduced else x

        def norm(self, ln: Any, x: torch.Tensor) -> torch.Tensor:
            return self.low(ln(self.f32(x)))

        def scores(self, q: torch.Tensor, k: torch.Tensor, scaling: float, bias: Any = None) -> torch.Tensor:
            """Attention probabilities [batch, heads, seq, keys], softmax in fp32.

            Reduced: q is scaled before the product (exact for head_dim 64, scaling 1/8) so the
            product's magnitude stays within fp16, then the scores are cast to fp32.
            """
            if self.reduced:
                w = torch.matmul(q * scaling, k.transpose(-1, -2)).float()
            else:
                w = torch.matmul(q, k.transpose(-1, -2)) * scaling
            if bias is not None:
                w = w + bias
            return self.low(torch.softmax(w, dim=-1))

        def attend(self, q: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, scaling: float, bias: torch.Tensor) -> torch.Tensor:
            """Attention of q [batch, heads, seq, hd] over the past [batch, heads, past, hd] and this call's keys
            and values [batch, heads, seq, hd], without copying the past: the scores over each are computed
            apart and joined before the softmax ([batch, heads, seq, past + seq], small), and the output is the
            sum of the two weighted values. Joining keys and values instead (a Concat) writes the whole cache
            every layer every step: about 200 MB a step at 1024 tokens on the full-size model.
            """
            q = q * scaling if self.reduced else q
            w = torch.cat([torch.matmul(q, past_k.transpose(-1, -2)), torch.matmul(q, k.transpose(-1, -2))], dim=-1)
            w = w.float() if self.reduced else w * scaling
            p = self.low(torch.softmax(w + bias, dim=-1))
            past = past_k.shape[2]
            out = self.f32(torch.matmul(p[..., :past], past_v)) + self.f32(torch.matmul(p[..., past:], v))
            return self.low(out)

    class VisionGraph(nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return image_features(self.model, pixel_values)

    class MixedVisionGraph(Precision):
        """`VisionGraph` with the ViT's matrix products in a reduced dtype (see REDUCED_PRECISION).

        Patch embedding, the fp32 residual stream, every LayerNorm, softmax, L2 normalisation and
        the image-to-text projection (19 M parameters, once per frame) stay fp32; input and
        output are fp32 [batch, 3, H, W] -> [batch, 64, D].
        """

        def __init__(self, model: Any, dtype: Any) -> None:
            super().__init__(dtype)
            vm = model.vision_model.model
            self.embeddings, self.pre, self.post = vm.embeddings, vm.pre_layrnorm, vm.post_layernorm
            self.projection = model.image_to_text_projection
            self.layers = nn.ModuleList(
                nn.ModuleDict(dict(ln1=lay.layer_norm1, ln2=lay.layer_norm2, q=self.lowp(lay.self_attn.q_proj),
                                   k=self.lowp(lay.self_attn.k_proj), v=self.lowp(lay.self_attn.v_proj),
                                   out=self.lowp(lay.self_attn.out_proj), fc1=self.lowp(lay.mlp.fc1),
                                   fc2=self.lowp(lay.mlp.fc2)))
                for lay in vm.encoder.layers)
            self.act = vm.encoder.layers[0].mlp.activation_fn
            self.heads = int(model.config.vision_config.num_attention_heads)
            self.scaling = float(vm.encoder.layers[0].self_attn.scale)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            hidden = self.pre(self.embeddings(pixel_values))
            bsz, seq, dim = hidden.shape
            for lay in self.layers:
                h = self.norm(lay["ln1"], hidden)
                q, k, v = (lay[n](h).view(bsz, seq, self.heads, dim // self.heads).transpose(1, 2) for n in "qkv")
                a = torch.matmul(self.scores(q, k, self.scaling), v).transpose(1, 2).reshape(bsz, seq, dim)
                hidden = hidden + self.f32(lay["out"](a))
                h = lay["fc2"](self.act(lay["fc1"](self.norm(lay["ln2"], hidden))))
                hidden = hidden + self.f32(h)
            embeds = nn.functional.normalize(self.post(hidden), dim=-1)
            return self.projection(embeds)[0]

    class DecoderGraph(Precision):
        """Kosmos2TextForCausalLM with explicit positions, masks and KV tensors.

        `dtype` fp16/bf16: the reduced-precision graph of REDUCED_PRECISION (KV in that dtype,
        residual stream, LayerNorms, softmax and logits in fp32); None: the fp32 graph.
        """

        def __init__(self, model: Any, dtype: Any = None) -> None:
            super().__init__(dtype)
            causal_lm = model.text_model
            text = causal_lm.model
            cfg = causal_lm.config
            self.embed_tokens = self.lowp(text.embed_tokens)
            self.layers = nn.ModuleList(
                nn.ModuleDict(dict(ln1=lay.self_attn_layer_norm, q=self.lowp(lay.self_attn.q_proj),
                                   k=self.lowp(lay.self_attn.k_proj), v=self.lowp(lay.self_attn.v_proj),
                                   out=self.lowp(lay.self_attn.out_proj), ln2=lay.final_layer_norm,
                                   fc1=self.lowp(lay.ffn.fc1), ffn_ln=lay.ffn.ffn_layernorm,
                                   fc2=self.lowp(lay.ffn.fc2),
                                   **({"inner_ln": lay.self_attn.inner_attn_ln}
                                      if lay.self_attn.inner_attn_ln is not None else {})))
                for lay in text.layers)
            self.act = text.layers[0].ffn.activation_fn
            self.scaling = float(text.layers[0].self_attn.scaling)
            self.layer_norm = text.layer_norm
            self.lm_head = self.lowp(causal_lm.lm_head)
            self.embed_scale = float(text.embed_scale)
            self.num_heads = int(cfg.attention_heads)
            self.head_dim = int(cfg.embed_dim) // self.num_heads
            rows = max(int(text.embed_positions.weights.shape[0]), MIN_POSITION_ROWS)
            table = text.embed_positions.get_embedding(rows, int(cfg.embed_dim), cfg.pad_token_id)
            self.register_buffer("position_table", table.to(torch.float32), persistent=False)

        def forward(self, input_ids, image_embeds, image_mask, position_ids, attention_mask, *past):
            bsz, seq = input_ids.shape
            tok = self.f32(self.embed_tokens(input_ids))
            # inputs_embeds[image_mask] = image_embeds, in order, without data-dependent shapes.
            img = image_embeds.to(tok.dtype).expand(bsz, -1, -1)
            # The running count of image positions, as a matrix product with an upper-triangular
            # 0/1 matrix (exact in fp32 for any count below 2**24): CumSum has no TensorRT 10.3 layer
            # (onnx-tensorrt builds it as a loop, float types only).
            steps = torch.arange(seq, device=input_ids.device)
            upper = (steps.unsqueeze(1) <= steps.unsqueeze(0)).to(torch.float32)
            counts = torch.matmul(image_mask.to(torch.float32), upper)
            index = (counts - 1).clamp(min=0).to(torch.int64)   # clamped in float: TensorRT's Clip is float-only
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
            split = (bsz, seq, self.num_heads, self.head_dim)
            for i, lay in enumerate(self.layers):
                h = self.norm(lay["ln1"], hidden)
                q, k, v = (lay[n](h).view(split).transpose(1, 2) for n in "qkv")
                presents += [k, v]
                a = self.attend(q, past[2 * i], past[2 * i + 1], k, v, self.scaling, bias)
                a = a.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
                if "inner_ln" in lay:
                    a = self.norm(lay["inner_ln"], a)
                hidden = hidden + self.f32(lay["out"](a))
                h = lay["fc1"](self.norm(lay["ln2"], hidden))
                h = lay["fc2"](self.norm(lay["ffn_ln"], self.act(h)))
                hidden = hidden + self.f32(h)
            # The last position as a Slice starting at seq - 1 (computed from the shape): a Gather at
            # index -1 on the dynamic axis is undefined in TensorRT (it may read zeros).
            last = torch.narrow(hidden, 1, seq - 1, 1).reshape(bsz, hidden.shape[-1])
            hidden = self.norm(self.layer_norm, last)
            logits = self.lm_head(hidden).float()
            return (logits, *presents)

    return VisionGraph, DecoderGraph, MixedVisionGraph


def kosmos2_attention() -> Optional[str]:
    """"eager" where transformers' default attention computes Kosmos-2 wrongly, else None (its default).

    transformers 5.0-5.14 (the range JetPack's torch allows) make `KosmosTextAttention.is_causal` always
    True, so under sdpa, their default, the image-to-text projection's latent queries get a causal mask that
    eager attention never applies: image embeddings then differ from eager's by more than their own size on
    the tiny checkpoint, and `generate` with them is not Kosmos-2. Later releases take `is_causal` as an
    argument (False for the projection) and agree with eager to 1e-9, so they keep their default.
    """
    import inspect

    from transformers.models.kosmos2 import modeling_kosmos2

    fixed = "is_causal" in inspect.signature(modeling_kosmos2.KosmosTextAttention.__init__).parameters
    return None if fixed else "eager"


def load_kosmos2(model_dir: str, **kwargs: Any) -> Any:
    """transformers' Kosmos2ForConditionalGeneration from a local directory, with attention that computes
    Kosmos-2 right on this transformers (`kosmos2_attention`; an explicit `attn_implementation` wins)."""
    from transformers import Kosmos2ForConditionalGeneration

    attention = kosmos2_attention()
    if attention and "attn_implementation" not in kwargs:
        kwargs["attn_implementation"] = attention
    return Kosmos2ForConditionalGeneration.from_pretrained(model_dir, **kwargs).eval()


def image_features(model: Any, pixel_values: Any) -> Any:
    """Kosmos-2's image embeddings [batch, 64, D] from pixels [batch, 3, H, W], as `generate` makes them.

    `Kosmos2ForConditionalGeneration.get_image_features` is recent (transformers 5.0-5.14, JetPack's
    range, have it on `Kosmos2Model` only); where it is missing, its four steps, as `forward` spells them.
    """
    if hasattr(model, "get_image_features"):
        return model.get_image_features(pixel_values, return_dict=True).pooler_output
    import torch

    hidden = model.vision_model(pixel_values=pixel_values, return_dict=True)[0]
    embeds = torch.nn.functional.normalize(model.vision_model.model.post_layernorm(hidden), dim=-1)
    return model.image_to_text_projection(embeds)[0]


def torch_dtype(precision: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def decoder_module(model: Any, precision: str = "fp32") -> Any:
    """The traced decoder as a torch module (tests compare it with transformers directly, and run
    the bf16 one where onnxruntime has no bf16 kernels)."""
    return _modules()[1](model, None if precision == "fp32" else torch_dtype(precision)).eval()


def vision_module(model: Any, precision: str = "fp32") -> Any:
    """The traced vision graph as a torch module: transformers' own for fp32, the mixed one otherwise."""
    vision_graph, _, mixed = _modules()
    return (vision_graph(model) if precision == "fp32" else mixed(model, torch_dtype(precision))).eval()
