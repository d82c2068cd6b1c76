"""Finding and loading a Kosmos-2 checkpoint and its processor, safely and with clear errors.

`from_pretrained` accepts a hub id or a local directory. Offline machines get an error that
says what was tried and how to point the package at a local copy.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from ..defaults import MODEL_ENV
from .vocab import GroundingVocab

_HOW_TO_POINT = (f"Point the package at a local copy: a directory saved with save_pretrained (config.json, "
                 f"model.safetensors, processor files), given as --model DIR, the `model` parameter, or "
                 f"the {MODEL_ENV} environment variable.")
# What the hub accepts as a repo id ("name" or "org/name"); anything else can only be a path.
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ModelNotFound(RuntimeError):
    """The model could not be found locally nor fetched."""


class UnsafeCheckpoint(RuntimeError):
    """The checkpoint needs pickle weights or remote code and the config does not allow it."""


def resolve_model(model: str, allow_download: bool = True, allow_pickle: bool = False) -> str:
    """A hub id or directory -> a local directory holding config, weights and processor files."""
    tried: List[str] = []
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        _check_safe(path, allow_pickle)
        return str(path)
    if looks_like_path(model):
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise ModelNotFound(f"cannot load model {model!r}. Tried: local directory {path.resolve()} ({what}); "
                            f"not looked up on the hub (a path, not a hub id). {_HOW_TO_POINT}")
    tried.append(f"local directory {path} (does not exist)")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt"] + (["*.bin"] if allow_pickle else [])
        try:
            local = snapshot_download(model, local_files_only=True, allow_patterns=patterns)
            tried.append("the Hugging Face cache: found")
        except Exception as exc:  # noqa: BLE001 - the hub raises many types; report them
            tried.append(f"the Hugging Face cache ({type(exc).__name__})")
            if not allow_download:
                raise
            local = snapshot_download(model, allow_patterns=patterns)
        _check_safe(Path(local), allow_pickle)
        return local
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # noqa: BLE001
        tried.append(f"downloading {model!r} from the hub ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
                     if allow_download else "no download (allow_download is false)")
        raise ModelNotFound(
            f"cannot load model {model!r}. Tried: " + "; ".join(tried) + ". " + _HOW_TO_POINT) from None


def looks_like_path(model: str) -> bool:
    """True for names only a directory can have (`/abs`, `./rel`, `~/x`, `a/b/c`): no hub look-up for them."""
    return model.startswith((".", "/", "~")) or model.endswith("/") or _HUB_ID_RE.fullmatch(model) is None


def quiet_libraries() -> None:
    """No progress bars or info chatter from transformers and the hub (they garble logs and launch output)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


def _check_safe(path: Path, allow_pickle: bool) -> None:
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise UnsafeCheckpoint(
            f"{path} holds only pickle weights (*.bin/*.pt), which can run code when loaded; "
            "convert them to safetensors, or set allow_pickle_weights: true if you trust the source")
    if not has_safetensors and not has_pickle:
        raise ModelNotFound(f"{path} has no weights (*.safetensors)")
    if not has_safetensors and not torch_loads_pickle():
        import torch

        raise UnsafeCheckpoint(
            f"{path} holds only pickle weights (*.bin/*.pt), and transformers loads those only with torch >= 2.6 "
            f"(torch {torch.__version__} here, as on JetPack 6); convert them to safetensors")
    _check_no_remote_code(path)


def torch_loads_pickle() -> bool:
    """Whether transformers will load pickle weights with this torch: it refuses below 2.6 (its `torch.load`
    safety rule), and JetPack 6's torch is 2.3-2.5."""
    import torch
    from packaging.version import Version

    return Version(torch.__version__).release[:2] >= (2, 6)


def _check_no_remote_code(path: Path) -> None:
    """A config naming custom classes (`auto_map`) needs remote code, which is never run here."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return   # a missing or broken config.json is reported by from_pretrained itself
    if isinstance(config, dict) and config.get("auto_map"):
        raise UnsafeCheckpoint(
            f"{path} needs remote code (config.json has auto_map: {sorted(config['auto_map'])}); this package "
            "never runs code shipped with a checkpoint (trust_remote_code is always false). Use a checkpoint "
            "of the stock transformers Kosmos-2 classes")


@dataclass
class PromptIds:
    input_ids: List[int]
    image_mask: List[int]


class TextCodec:
    """The processor's text side: prompt -> ids exactly as `Kosmos2Processor(text, images)`, ids -> text.

    Reproduces the processor's id layout without re-processing an image for every prompt:
    `<s> <image> [64 image slots] </image> {text}`, slots filled with ids unk+1..unk+64.
    """

    def __init__(self, processor: Any, num_image_tokens: int = 64) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.vocab = GroundingVocab.from_tokenizer(self.tokenizer)
        self.num_image_tokens = num_image_tokens
        self._image_token_ids = list(range(self.tokenizer.unk_token_id + 1,
                                           self.tokenizer.unk_token_id + 1 + num_image_tokens))

    def encode(self, text: str, bboxes: Optional[Sequence[Tuple[float, float, float, float]]] = None) -> PromptIds:
        full = self.processor.preprocess_examples(text, images=True, bboxes=list(bboxes) if bboxes else None,
                                                  num_image_tokens=self.num_image_tokens)
        ids = self.tokenizer(f"{self.tokenizer.bos_token}{full}", add_special_tokens=False)["input_ids"]
        start = 2  # after <s> and the real <image>
        n = self.num_image_tokens
        ids = ids[:start] + self._image_token_ids + ids[start + n:]
        mask = [0, 0] + [1] * n + [0]
        mask += [0] * (len(ids) - len(mask))
        return PromptIds(list(ids), mask)

    def decode(self, ids: Sequence[int]) -> str:
        """As the reference: `batch_decode(..., skip_special_tokens=True)` of prompt + generation."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def checkpoint_no_repeat_ngram_size(model_dir: str) -> int:
    """`no_repeat_ngram_size` of the checkpoint's `generation_config.json` (0 when it sets none).

    Read here because transformers' Kosmos-2 `generate` does not apply it (its text model
    builds its generation config from the model config), yet the authors decode with it
    (microsoft/kosmos-2-patch14-224 ships 3).
    """
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return 0
    try:
        value = json.loads(path.read_text()).get("no_repeat_ngram_size") or 0
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelNotFound(f"cannot read {path}: {exc}; fix or delete the file") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelNotFound(f"{path}: no_repeat_ngram_size must be a non-negative integer, got {value!r}")
    return value


def load_processor(model_dir: str) -> Any:
    """The checkpoint's processor with the PIL image processor everywhere: transformers takes torchvision's
    ("fast") one where torchvision is installed (a GPU machine, a Jetson), and its pixels differ from PIL's,
    so tokens would depend on what else is installed."""
    from transformers import AutoProcessor
    from transformers.models.auto import image_processing_auto

    # Newer transformers name image-processor backends ("pil", "torchvision") and deprecate `use_fast`.
    pil = {"backend": "pil"} if hasattr(image_processing_auto, "_resolve_backend") else {"use_fast": False}
    return AutoProcessor.from_pretrained(model_dir, trust_remote_code=False, **pil)
