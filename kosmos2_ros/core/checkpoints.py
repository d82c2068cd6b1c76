"""Tiny random Kosmos-2 checkpoints for tests and benchmarks, saved like real ones.

No model hub is reachable on CI, so tests build a small model and its processor here (with a
tokenizer trained in code), save them with `save_pretrained`, and then load them back through
the package's real loading path. `full_size=True` gives the real architecture with random
weights: the same compute as microsoft/kosmos-2-patch14-224, for honest speed figures.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

# Words that show up in the demo, tests and benchmarks, so the tiny tokenizer has pieces for them.
CORPUS = (
    "An image of a red mug on a wooden table next to a laptop.",
    "Describe this image in detail: a robot arm picks up the blue box.",
    "Question: What is on the left of the laptop? Answer: a red mug.",
    "It is a green ball in front of the yellow chair.",
    "the cup, the bottle, the person, the dog, the cat, the snowman, the fire, the door",
    "left right top bottom middle small large near far behind above below",
    "A man walking a dog on the beach, warming himself by a fire.",
)


def _train_tokenizer(vocab_size: int, corpus: Iterable[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import XLMRobertaTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],  # ids 0-3 as in the real checkpoint
        unk_token="<unk>",
    )
    tok.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return XLMRobertaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<unk>",
    )


def build_processor(image_size: int = 224, vocab_size: int = 400):
    """A Kosmos2Processor: CLIP image processor set up as the real checkpoint's, tiny tokenizer."""
    from transformers import CLIPImageProcessor, Kosmos2Processor

    image_processor = CLIPImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size},
        do_center_crop=False, crop_size={"height": image_size, "width": image_size},
        do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True,
        resample=3,
    )
    return Kosmos2Processor(image_processor, _train_tokenizer(vocab_size, CORPUS))


def tiny_config(vocab_size: int, image_size: int = 224, full_size: bool = False,
                latent_query_num: int = 64):
    from transformers import Kosmos2Config

    if full_size:
        cfg = Kosmos2Config()  # the real architecture: 1.664 B parameters
        cfg.text_config.vocab_size = max(vocab_size, cfg.text_config.vocab_size)
        return cfg
    text = dict(vocab_size=vocab_size, embed_dim=64, layers=2, attention_heads=4, ffn_dim=128,
                max_position_embeddings=512, layer_norm_eps=1e-5, dropout=0.0,
                attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True,
                use_cache=True)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=image_size, patch_size=28, layer_norm_eps=1e-5)
    return Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=latent_query_num)


def build_tiny_checkpoint(out_dir: Union[str, os.PathLike], seed: int = 0, full_size: bool = False,
                          image_size: int = 224, vocab_size: Optional[int] = None) -> Path:
    """Build a random Kosmos-2 with its processor and `save_pretrained` both into `out_dir`."""
    import torch
    from transformers import Kosmos2ForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor(image_size=image_size)
    torch.manual_seed(seed)
    config = tiny_config(vocab_size or len(processor.tokenizer), image_size=image_size, full_size=full_size)
    tok = processor.tokenizer
    for sub in (config, config.text_config):
        sub.bos_token_id, sub.eos_token_id, sub.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model = Kosmos2ForConditionalGeneration(config).eval()
    if not full_size:
        # Random init makes every logit tiny and alike; sharpen the output so greedy decoding is
        # decisive and exercises location tokens, phrases and eos like a trained model would.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(4.0)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
