"""transformers' own greedy `generate`: the reference every backend and mode is measured against.

The naive way a user runs Kosmos-2 (processor + generate per prompt, unbatched), used by the
equality tests and as the benchmark's baseline. Not used on the serving path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple


@dataclass
class ReferenceOutput:
    new_ids: List[int]            # generated ids (after the prompt)
    text: str                     # batch_decode(skip_special_tokens=True) of prompt + generation
    parsed: Tuple[str, list]      # processor.post_process_generation(text)


def reference_generate(model: Any, processor: Any, prompt: str, image: Any, max_new_tokens: int,
                       bboxes: Optional[list] = None, no_repeat_ngram_size: Optional[int] = None) -> ReferenceOutput:
    """Greedy `model.generate` for one prompt and image (PIL or H x W x 3 uint8 RGB).

    `no_repeat_ngram_size` is always passed to `generate` explicitly: Kosmos-2's `generate` ignores
    the checkpoint's generation config for it. None = the checkpoint's value (0 when it has none),
    which is what the pipeline uses by default.
    """
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    inputs = processor(text=prompt, images=image, bboxes=bboxes, return_tensors="pt")
    weight = next(model.parameters())
    inputs = {k: v.to(weight.device) for k, v in inputs.items()}
    with torch.inference_mode():
        out = model.generate(pixel_values=inputs["pixel_values"].to(weight.dtype), input_ids=inputs["input_ids"],
                             attention_mask=inputs["attention_mask"],
                             image_embeds_position_mask=inputs["image_embeds_position_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             no_repeat_ngram_size=checkpoint_ngram(model) if no_repeat_ngram_size is None
                             else int(no_repeat_ngram_size))
    n_prompt = inputs["input_ids"].shape[1]
    text = processor.batch_decode(out, skip_special_tokens=True)[0]
    return ReferenceOutput(out[0, n_prompt:].tolist(), text, processor.post_process_generation(text))


def checkpoint_ngram(model: Any) -> int:
    """The loaded checkpoint's `generation_config.no_repeat_ngram_size` (0 when unset)."""
    return int(getattr(model.generation_config, "no_repeat_ngram_size", 0) or 0)
