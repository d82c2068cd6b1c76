"""A tiny Kosmos-2 briefly trained to answer referring expressions with boxes.

A random tiny model's greedy output is degenerate (it repeats one token), so it never shows
whether constrained decoding finds the same boxes as free decoding. This one is trained for a
few seconds on `<grounding><phrase> X</phrase>` -> `<object><p><p></object></s>` (one or two
boxes, depending on the phrase and on the image's brightness), so free decoding yields real,
image-dependent boxes, and sometimes malformed ones, as a trained model can.
Used by test/test_decoding.py and bench/bench_refer.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

EXPRESSIONS = ("the cup", "the red mug", "the laptop", "the blue box", "the dog", "the person",
               "the green ball", "the door")


def toy_image(seed: int, size: int = 96):
    """A random RGB frame; its brightness class (dark / bright) changes the trained answer."""
    import numpy as np

    rng = np.random.RandomState(seed)
    base = 40 if seed % 2 == 0 else 200
    return np.clip(rng.randint(-40, 40, (size, size + 16, 3)) + base, 0, 255).astype(np.uint8)


def _target(vocab, expr_index: int, bright: int) -> List[int]:
    k = expr_index * 2 + bright
    first = vocab.first_patch
    a = (37 * k + 5) % 512
    b = a + 33 + (k % 7) * 32 + k % 5
    out = [vocab.object_open, first + a, first + min(b, 1023)]
    if k % 5 == 3:  # some answers have two boxes
        out += [vocab.delimiter, first + (a + 100) % 512, first + min(b + 200, 1023)]
    return out + [vocab.object_close, vocab.eos]


def build_toy_grounding_checkpoint(src_dir: str, out_dir: str, steps: int = 100, seed: int = 0) -> Path:
    """Load `src_dir` (a tiny checkpoint), train it briefly, save model + processor to `out_dir`."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import Kosmos2ForConditionalGeneration

    from kosmos2_ros.core.loading import TextCodec, load_processor

    torch.manual_seed(seed)
    processor = load_processor(src_dir)
    codec = TextCodec(processor)
    vocab = codec.vocab
    model = Kosmos2ForConditionalGeneration.from_pretrained(src_dir, dtype=torch.float32)
    model.train()
    pixels = {}
    for s in range(8):
        img = Image.fromarray(toy_image(s))
        pixels[s] = torch.from_numpy(processor.image_processor(images=img, return_tensors="np")["pixel_values"])
    examples: List[Tuple[List[int], List[int], int, int]] = []
    for e, expr in enumerate(EXPRESSIONS):
        p = codec.encode(f"<grounding><phrase> {expr}</phrase>")
        for s in range(8):
            tgt = _target(vocab, e, s % 2)
            examples.append((p.input_ids + tgt, p.image_mask + [0] * len(tgt), len(p.input_ids), s))
    width = max(len(x[0]) for x in examples)
    ids = torch.full((len(examples), width), vocab.pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (seq, m, plen, _) in enumerate(examples):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(m)] = torch.tensor(m)
        att[i, :len(seq)] = 1
        labels[i, plen:len(seq)] = torch.tensor(seq[plen:])
    with torch.no_grad():  # the vision side stays as built: train only the text decoder
        embeds = {s: model.get_image_features(pv, return_dict=True).pooler_output for s, pv in pixels.items()}
    image_embeds = torch.cat([embeds[x[3]] for x in examples])
    opt = torch.optim.Adam(model.text_model.parameters(), lr=3e-3)
    gen = np.random.RandomState(seed)
    for _ in range(steps):
        pick = torch.from_numpy(gen.choice(len(examples), 32, replace=False))
        out = model.text_model(input_ids=ids[pick], image_embeds=image_embeds[pick],
                               image_embeds_position_mask=mask[pick], attention_mask=att[pick], labels=labels[pick])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    out_path = Path(out_dir)
    model.save_pretrained(out_path)
    processor.save_pretrained(out_path)
    return out_path
