"""Tiny Kosmos-2 checkpoints for tests and benchmarks, saved like real ones.

No model hub is reachable on CI, so tests build a small model and its processor here (with a
tokenizer trained in code), save them with `save_pretrained`, and then load them back through
the package's real loading path.

- `train=True` (the default for tiny models) fits the tiny model for a few seconds on CPU to
  synthetic scenes (coloured squares at known places) written in Kosmos-2's grounded format,
  so greedy decoding gives well-formed phrases, boxes and eos instead of one repeated token.
  It is structured, not good.
- `train=False` keeps random weights (sharpened so greedy decoding is decisive).
- `full_size=True` gives the real architecture with random weights, never trained: the same
  compute as microsoft/kosmos-2-patch14-224, for honest speed figures.
- `build_toy_grounding_checkpoint` trains a tiny checkpoint further on referring expressions
  only (`<grounding><phrase> X</phrase>` -> one or two boxes, depending on the phrase and the
  image's brightness), so free decoding yields image-dependent boxes, sometimes malformed ones,
  as a trained model can (test_decoding, bench_refer).
- `build_which_one_checkpoint` trains it on "is it there, and which one" (`which_one_cells`), with
  `which_one_rates` and `write_which_one_set` (a `kosmos2-eval` set) to measure it
  (test_candidates, test_eval, bench/which_one_toy.py).

Test, demo and benchmark support only: nothing the node runs imports this module (test_checkpoints).
One training loop (`fit`) serves both.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .backends.modules import image_features, kosmos2_attention, load_kosmos2
from .grounding import box_iou, box_to_patch_index, patch_index_to_box
from .scenes import OBJECTS, draw_scene
from .vocab import patch_token

# Words that show up in the demo, tests, benchmarks and training texts, so the tiny tokenizer
# has pieces for them.
CORPUS = (
    "An image of a red mug on a wooden table next to a laptop.",
    "Describe this image in detail: a robot arm picks up the blue box.",
    "Question: What is on the left of the laptop? Answer: a red mug.",
    "It is a green ball in front of the yellow chair.",
    "the cup, the bottle, the person, the dog, the cat, the snowman, the fire, the door",
    "left right top bottom middle small large near far behind above below",
    "A man walking a dog on the beach, warming himself by a fire.",
    "a red square, a blue square, a green square and a yellow square on a grey table.",
    "There is a square. Where is the square? What color is the square? Red. Blue. Green. Yellow.",
    "What is on the table? How many squares are there? One. Two. Three. Four.",
)

# Training budget of the tiny model: a fixed number of steps (never a wall-clock cap, so every
# machine, fast or busy, trains the same weights from the same seed).
TRAIN_STEPS = 200
TRAIN_BATCH = 16


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
    # The trainer yields the same pieces and scores every time but in a varying order (hash maps),
    # so ids would change between builds; rebuild the model with the pieces in a fixed order.
    pieces = json.loads(tok.to_str())["model"]["vocab"]
    specials, rest = pieces[:4], sorted(pieces[4:], key=lambda p: p[0])
    tok.model = models.Unigram([tuple(p) for p in specials + rest], unk_id=3, byte_fallback=False)
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

    # Attention that computes Kosmos-2 right on this transformers (`kosmos2_attention`): trained under 5.0-5.14's
    # sdpa, which masks the image-to-text projection causally, a checkpoint would ground with other image embeddings.
    attention = {"attn_implementation": kosmos2_attention()} if kosmos2_attention() else {}
    if full_size:
        cfg = Kosmos2Config(**attention)  # the real architecture: 1.664 B parameters
        cfg.text_config.vocab_size = max(vocab_size, cfg.text_config.vocab_size)
        return cfg
    text = dict(vocab_size=vocab_size, embed_dim=64, layers=2, attention_heads=4, ffn_dim=128,
                max_position_embeddings=512, layer_norm_eps=1e-5, dropout=0.0,
                attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True,
                use_cache=True)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=image_size, patch_size=28, layer_norm_eps=1e-5)
    return Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=latent_query_num, **attention)


# -- synthetic grounded training data --------------------------------------------------------

def _obj(box_norm: Tuple[float, float, float, float]) -> str:
    ul, lr = box_to_patch_index(box_norm)
    return f"<object>{patch_token(ul)}{patch_token(lr)}</object>"


def _side(box_norm: Tuple[float, float, float, float]) -> str:
    return "left" if (box_norm[0] + box_norm[2]) / 2 < 0.5 else "right"


def training_texts(objects: List[Dict[str, Any]], width: int, height: int) -> List[str]:
    """Grounded texts for one scene, one per Kosmos-2 task, as the model should write them.

    Each is a full sequence (prompt and answer) without `<s>`, `<image>` or the final `</s>`.
    """
    boxes = [(o["box"][0] / width, o["box"][1] / height, o["box"][2] / width, o["box"][3] / height)
             for o in objects]
    names = [o["name"] for o in objects]
    colours = [n.split()[1] for n in names]
    listed = ",".join(f"<phrase> {n}</phrase>{_obj(b)}" for n, b in zip(names, boxes))
    first, first_box = names[0], boxes[0]
    texts = [f"<grounding>An image of{listed}.",
             f"<grounding>Describe this image in detail: There is{listed} on a grey table.",
             f"<grounding> Question: What color is the square? Answer: {colours[0].capitalize()}.",
             f"<grounding> Question: Where is {first}? Answer:<phrase> {first}</phrase>{_obj(first_box)}"
             f" is on the {_side(first_box)}."]
    for name, box in zip(names, boxes):
        texts.append(f"<grounding><phrase> {name}</phrase>{_obj(box)}")
        texts.append(f"<grounding><phrase> It</phrase>{_obj(box)} is {name}.")
    return texts


def _training_batches(processor: Any, rng: np.random.Generator, scenes: int) -> Dict[str, Any]:
    """Tokenised synthetic scenes (images through the real processor), with LM labels."""
    import torch
    from PIL import Image

    texts: List[str] = []
    images: List[Any] = []
    for _ in range(scenes):
        width, height = int(rng.integers(160, 400)), int(rng.integers(160, 400))
        count = int(rng.integers(1, len(OBJECTS) + 1))
        rgb, objects = draw_scene(width, height, rng, count=count)
        # The scene helper always draws objects in the same order; shuffle who is mentioned first.
        order = rng.permutation(len(objects))
        objects = [objects[i] for i in order]
        image = Image.fromarray(rgb)
        for text in training_texts(objects, width, height):
            texts.append(text)
            images.append(image)
    enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
    tok = processor.tokenizer
    ids = enc["input_ids"]
    lengths = enc["attention_mask"].sum(dim=1)
    # Append </s> after each sequence (the processor adds <s> only).
    pad_col = torch.full((ids.shape[0], 1), tok.pad_token_id, dtype=ids.dtype)
    ids = torch.cat([ids, pad_col], dim=1)
    ids[torch.arange(ids.shape[0]), lengths] = tok.eos_token_id
    attn = (torch.arange(ids.shape[1])[None, :] <= lengths[:, None]).long()
    img_mask = torch.cat([enc["image_embeds_position_mask"], torch.zeros_like(pad_col)], dim=1)
    labels = ids.clone()
    labels[attn == 0] = -100
    labels[img_mask == 1] = -100
    eoi = tok.convert_tokens_to_ids("</image>")
    # Learn the text after </image> (tags, boxes, eos); the fixed image header is not text to learn.
    after = torch.cumsum((ids == eoi).long(), dim=1) > 0
    labels[~after] = -100
    labels[ids == eoi] = -100
    return dict(pixel_values=enc["pixel_values"], input_ids=ids, attention_mask=attn,
                image_embeds_position_mask=img_mask, labels=labels)


def train_tiny_model(model: Any, processor: Any, seed: int = 0, steps: int = TRAIN_STEPS,
                     batch_size: int = TRAIN_BATCH) -> Dict[str, float]:
    """Fit the tiny model to synthetic grounded scenes for a few seconds (CPU, deterministic seed)."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = _training_batches(processor, rng, scenes=48)
    # One thread: tiny matmuls gain nothing from more, and a busy machine (parallel test runs)
    # makes multi-threaded torch spin and crawl.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(model, data, lambda n: rng.choice(n, size=min(batch_size, n), replace=False), steps, lr=1e-2,
                   schedule=True, clip=1.0, trim=True)
    finally:
        torch.set_num_threads(threads)


def fit(model: Any, data: Dict[str, Any], pick: Callable[[int], np.ndarray], steps: int, lr: float,
        forward: Optional[Callable[..., Any]] = None, params: Optional[Iterable[Any]] = None,
        schedule: bool = False, clip: Optional[float] = None, trim: bool = False) -> Dict[str, float]:
    """The one training loop: `steps` of Adam on batches `pick(n)` of `data` (tensors, first axis = example).

    `forward` (default: the model) takes a batch as keyword arguments and returns `.loss`; `params`
    (default: all) are trained. `schedule`: one-cycle learning rate; `clip`: gradient norm limit;
    `trim`: drop the batch's shared right padding (cheaper short batches).
    """
    import torch

    n = data["input_ids"].shape[0]
    forward = forward or model
    params = list(params if params is not None else model.parameters())
    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1) if schedule else None
    t0 = time.perf_counter()
    first = last = float("nan")
    for step in range(steps):
        idx = torch.from_numpy(pick(n))
        batch = {k: v[idx] for k, v in data.items()}
        if trim:
            width = int(batch["attention_mask"].sum(dim=1).max())
            batch = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in batch.items()}
        loss = forward(**batch).loss
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if sched is not None:
            sched.step()
        last = float(loss.detach())
        if step == 0:
            first = last
    model.eval()
    return {"steps": float(steps), "first_loss": first, "last_loss": last, "seconds": time.perf_counter() - t0}


def build_tiny_checkpoint(out_dir: Union[str, os.PathLike], seed: int = 0, full_size: bool = False,
                          image_size: int = 224, vocab_size: Optional[int] = None,
                          train: Optional[bool] = None, no_repeat_ngram_size: int = 0) -> Path:
    """Build a tiny Kosmos-2 with its processor and `save_pretrained` both into `out_dir`.

    `train` (default: True unless `full_size`) fits the tiny model to synthetic grounded scenes
    for a few seconds; `train=False` keeps random weights. Full-size models are never trained.
    `no_repeat_ngram_size` goes into the saved generation config, as the real checkpoint's 3 does.
    """
    import torch
    from transformers import Kosmos2ForConditionalGeneration

    if train is None:
        train = not full_size
    if train and full_size:
        raise ValueError("full_size checkpoints keep random weights; train=True is for tiny models only")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor(image_size=image_size)
    torch.manual_seed(seed)
    config = tiny_config(vocab_size or len(processor.tokenizer), image_size=image_size, full_size=full_size)
    tok = processor.tokenizer
    for sub in (config, config.text_config):
        sub.bos_token_id, sub.eos_token_id, sub.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model = Kosmos2ForConditionalGeneration(config).eval()
    if train:
        stats = train_tiny_model(model, processor, seed=seed)
        (out / "tiny_training.txt").write_text(
            "Tiny test checkpoint trained on synthetic coloured squares (not Kosmos-2's weights): "
            + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()) + "\n")
    elif not full_size:
        # Random init makes every logit tiny and alike; sharpen the output so greedy decoding is
        # decisive and exercises location tokens, phrases and eos like a trained model would.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(4.0)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    if no_repeat_ngram_size:   # as microsoft/kosmos-2-patch14-224's generation_config.json (3)
        model.generation_config.no_repeat_ngram_size = int(no_repeat_ngram_size)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def full_size_in_memory(out_dir: Union[str, os.PathLike], dtype: Any, device: str, seed: int = 0) -> Tuple[Any, Path]:
    """(model, out_dir): the real architecture with random weights, made on `device` and cast to `dtype`, with
    its processor and config (no weights) saved to `out_dir`: what the GPU check times, without writing and
    reading 6.6 GB of weights it would never need again."""
    import torch
    from transformers import Kosmos2ForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    config = tiny_config(len(processor.tokenizer), full_size=True)
    tok = processor.tokenizer
    for sub in (config, config.text_config):
        sub.bos_token_id, sub.eos_token_id, sub.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = Kosmos2ForConditionalGeneration(config).eval()
    model = model.to(dtype)
    config.save_pretrained(out)
    processor.save_pretrained(out)
    return model, out


# -- a toy trained on referring expressions only ---------------------------------------------------
EXPRESSIONS = ("the cup", "the red mug", "the laptop", "the blue box", "the dog", "the person",
               "the green ball", "the door")


def toy_image(seed: int, size: int = 96) -> np.ndarray:
    """A random RGB frame; its brightness class (dark / bright) changes the trained answer."""
    rng = np.random.RandomState(seed)
    base = 40 if seed % 2 == 0 else 200
    return np.clip(rng.randint(-40, 40, (size, size + 16, 3)) + base, 0, 255).astype(np.uint8)


def _toy_target(vocab: Any, expr_index: int, bright: int) -> List[int]:
    k = expr_index * 2 + bright
    first = vocab.first_patch
    a = (37 * k + 5) % 512
    b = a + 33 + (k % 7) * 32 + k % 5
    out = [vocab.object_open, first + a, first + min(b, 1023)]
    if k % 5 == 3:  # some answers have two boxes
        out += [vocab.delimiter, first + (a + 100) % 512, first + min(b + 200, 1023)]
    return out + [vocab.object_close, vocab.eos]


def build_toy_grounding_checkpoint(src_dir: str, out_dir: str, steps: int = 100, seed: int = 0,
                                   target: Optional[Callable[[Any, int, int], List[List[int]]]] = None,
                                   images: int = 8, lr: float = 3e-3, schedule: bool = False) -> Path:
    """Load `src_dir` (a tiny checkpoint), train its text decoder briefly on referring expressions, save to `out_dir`.

    Trained on every expression of `EXPRESSIONS` with `toy_image(0 .. images - 1)`. `target(vocab,
    expression index, image index)` -> the answers' ids (default `_toy_target`: one or two boxes that
    depend on the expression and the image's brightness class); an image may have several answers
    (each becomes an example, so the model learns them as equally likely). `schedule`: one-cycle
    learning rate.
    """
    import torch
    from PIL import Image

    from .loading import TextCodec, load_processor

    torch.manual_seed(seed)
    processor = load_processor(src_dir)
    codec = TextCodec(processor)
    vocab = codec.vocab
    model = load_kosmos2(src_dir, dtype=torch.float32)
    model.train()
    pixels = {s: torch.from_numpy(processor.image_processor(images=Image.fromarray(toy_image(s)),
                                                            return_tensors="np")["pixel_values"])
              for s in range(images)}
    examples: List[Tuple[List[int], List[int], int, int]] = []
    for e, expr in enumerate(EXPRESSIONS):
        p = codec.encode(f"<grounding><phrase> {expr}</phrase>")
        for s in range(images):
            answers = target(vocab, e, s) if target is not None else [_toy_target(vocab, e, s % 2)]
            for tgt in answers:
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
        embeds = {s: image_features(model, pv) for s, pv in pixels.items()}
    data = dict(input_ids=ids, image_embeds=torch.cat([embeds[x[3]] for x in examples]),
                image_embeds_position_mask=mask, attention_mask=att, labels=labels)
    gen = np.random.RandomState(seed)
    fit(model, data, lambda n: gen.choice(n, min(32, n), replace=False), steps, lr=lr, forward=model.text_model,
        params=model.text_model.parameters(), schedule=schedule)
    out_path = Path(out_dir)
    model.save_pretrained(out_path)
    processor.save_pretrained(out_path)
    return out_path


# -- a toy for "is it there, and which one" ----------------------------------------------------------
#: Toy images (`toy_image(seed)`) stand for scene kinds by their brightness class: in a dark one
#: (even seed) the object of an even expression is there once, in a bright one (odd seed) two objects
#: fit every odd expression, and the other half of the expressions is absent (so every expression is
#: absent from the next image: `kosmos2-eval`'s negatives are true ones on `write_which_one_set`).
#: The "which one" checkpoint is trained on exactly that. The scene kind
#: comes from the image, the places from the expression: the tiny checkpoint's random ViT and resampler
#: pass on an image's overall look but not where things are (a linear probe of its 64 projected image
#: tokens told which of 16 slots held a red square at chance, 4-9 %, against 100 % from the ViT's own
#: patch features), so no toy built from it learns to find an object in the pixels.
WHICH_ONE_ABSENT_TEXT = " is not in the image."
WHICH_ONE_TRAIN_IMAGES = 32
#: Toy images the "which one" checkpoint was not trained on (it is trained on seeds 0 .. 31).
WHICH_ONE_TEST_IMAGES = range(100, 116)


def which_one_cells(expr_index: int, image_index: int) -> List[Tuple[int, int]]:
    """The (upper-left, lower-right) cells of the objects that fit an expression in a toy image:
    none (absent), one (dark image, even expression) or two (bright image, odd expression)."""
    bright = image_index % 2 == 1
    if bright != (expr_index % 2 == 1):
        return []
    # An upper-left cell at row 1..12, column 1..12 (each expression its own), so that the box (4 x 4
    # cells) and the other object's (14 cells to the right) fit inside the 32 x 32 grid.
    a = 32 * (1 + (5 * expr_index) % 12) + 1 + (3 * expr_index) % 12
    return [(c, c + 3 * 32 + 3) for c in ([a, a + 14] if bright else [a])]


def which_one_answers(vocab: Any, expr_index: int, image_index: int) -> List[List[int]]:
    """The toy's answers: absent ([], filled with text by the builder), one box, or either of two boxes."""
    cells = which_one_cells(expr_index, image_index)
    if not cells:
        return [[]]
    return [[vocab.object_open, vocab.first_patch + ul, vocab.first_patch + lr, vocab.object_close, vocab.eos]
            for ul, lr in cells]


def build_which_one_checkpoint(src_dir: str, out_dir: str, steps: int = 600, seed: int = 0,
                               images: int = WHICH_ONE_TRAIN_IMAGES) -> Path:
    """A toy trained (from a tiny checkpoint) to answer presence and ambiguity from the image (see
    `which_one_answers`): absent objects answer with text, two-object scenes with either box.

    Trained on `toy_image(0 .. images - 1)`; test it on later seeds. 600 steps of one-cycle Adam
    (peak 1e-2) on 32 images is what made the two boxes about equally likely on unseen images
    (240 steps on 8 images at 3e-3 learnt them for half the expressions only); ~35 s on 2 cores.
    """
    from .loading import TextCodec, load_processor

    processor = load_processor(src_dir)
    absent = list(processor.tokenizer(WHICH_ONE_ABSENT_TEXT, add_special_tokens=False)["input_ids"])
    absent.append(TextCodec(processor).vocab.eos)

    def target(vocab: Any, e: int, s: int) -> List[List[int]]:
        return [t if t else list(absent) for t in which_one_answers(vocab, e, s)]

    return build_toy_grounding_checkpoint(src_dir, out_dir, steps=steps, seed=seed, target=target, images=images,
                                          lr=1e-2, schedule=True)


def which_one_rates(pipe: Any, seeds: Iterable[int]) -> Dict[str, Dict[str, float]]:
    """How a pipeline on the "which one" toy does on `toy_image(seed)` scenes, per scene kind.

    Per kind ("absent", "one", "two" objects that fit): `n`, `presence_median`, `found` (presence >=
    0.5), and for scenes with objects `chosen_right` (the chosen box reaches IoU 0.5 with a true one),
    `ambiguous` (the flag's rate), `ambiguity_median`; for two-object scenes `second_found` (of those
    whose chosen box is right: the other object among the candidates at IoU 0.5).
    """
    from .frames import Frame
    from .pipeline import Command

    rows: Dict[str, List[Dict[str, float]]] = {"absent": [], "one": [], "two": []}
    for seed in seeds:
        frame = Frame(rgb=toy_image(seed))
        for e, expr in enumerate(EXPRESSIONS):
            truth = [patch_index_to_box(ul, lr) for ul, lr in which_one_cells(e, seed)]
            res = pipe.run(Command(id=f"{seed}-{e}", task="refer", text=expr), frame)
            row = {"presence": res.presence, "found": float(res.presence >= 0.5)}
            if truth:
                hits = [bool(res.objects) and box_iou(res.objects[0].box_norm, t) >= 0.5 for t in truth]
                row.update(chosen_right=float(any(hits)), ambiguous=float(res.ambiguous), ambiguity=res.ambiguity)
                if len(truth) == 2 and any(hits):
                    other = truth[1 - hits.index(True)]
                    row["second_found"] = float(any(box_iou(c.box_norm, other) >= 0.5 for c in res.candidates))
            rows[("absent", "one", "two")[len(truth)]].append(row)
    out: Dict[str, Dict[str, float]] = {}
    for kind, kind_rows in rows.items():
        stats = {"n": float(len(kind_rows)),
                 "presence_median": float(np.median([r["presence"] for r in kind_rows])),
                 "found": float(np.mean([r["found"] for r in kind_rows]))}
        for key in ("chosen_right", "ambiguous", "second_found"):
            values = [r[key] for r in kind_rows if key in r]
            if values:
                stats[key] = float(np.mean(values))
        if kind != "absent":
            stats["ambiguity_median"] = float(np.median([r["ambiguity"] for r in kind_rows]))
        out[kind] = stats
    return out


def write_which_one_set(folder: Union[str, os.PathLike], seeds: Sequence[int]) -> Path:
    """The toy's scenes as a referring-expression set for `kosmos2-eval` (MDETR's RefCOCO layout):
    `toy_image(seed)` saved as PNG, one entry per expression present in it, whose truth is one box: in
    a two-object scene the left one or the right one by turns, as an annotator names one of two
    objects that fit, so a pick between them is right about half the time and the candidates should
    hold the truth. `seeds`: an even number of consecutive ones, so that each expression is absent
    from the next image (and the last image's from the first): the set's negatives are true ones.
    Returns the annotation file."""
    from PIL import Image

    seeds = list(seeds)
    if len(seeds) < 2 or len(seeds) % 2 or seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"seeds must be an even number of consecutive ones, got {seeds}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for seed in seeds:
        rgb = toy_image(seed)
        height, width = rgb.shape[:2]
        name = f"toy_{seed}.png"
        Image.fromarray(rgb).save(out / name)
        for e, expr in enumerate(EXPRESSIONS):
            cells = which_one_cells(e, seed)
            if not cells:
                continue
            named = cells[(seed // 2 + e // 2) % len(cells)]    # of two: the left or the right, by turns
            x0, y0, x1, y1 = patch_index_to_box(*named)
            eid = 100 * seed + e
            images.append({"id": eid, "file_name": name, "width": width, "height": height, "caption": expr,
                           "dataset_name": "refcoco"})
            annotations.append({"id": eid, "image_id": eid, "category_id": 1, "iscrowd": 0, "area": 1.0,
                                "bbox": [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]})
    path = out / "which_one_toy.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "object"}]}))
    return path
