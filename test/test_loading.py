"""Finding and loading checkpoints: clear errors when missing, pickle refused unless allowed."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from kosmos2_ros.core.model.loading import (
    MODEL_ENV,
    ModelNotFound,
    TextCodec,
    UnsafeCheckpoint,
    load_processor,
    looks_like_path,
    resolve_model,
    torch_loads_pickle,
)
from kosmos2_ros.core.serving.config import Kosmos2Config
from kosmos2_ros.core.serving.frames import Frame
from kosmos2_ros.core.serving.pipeline import Command, Pipeline, Status


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub here: stay offline, with an empty Hugging Face cache of our own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def _message_says_what_and_how(message: str, model: str, hub: bool = True) -> None:
    assert repr(model) in message
    assert "Tried:" in message
    assert "local directory" in message and "does not exist" in message
    # A path is never looked up on the hub (no cache or download noise for a mistyped directory).
    assert ("Hugging Face cache" in message) == hub
    # how to point the package at a local copy
    assert "save_pretrained" in message and "--model DIR" in message and MODEL_ENV in message


@pytest.mark.parametrize("allow_download", [True, False])
def test_missing_hub_model(allow_download: bool) -> None:
    model = "nobody-here/kosmos-2-missing"
    with pytest.raises(ModelNotFound) as info:
        resolve_model(model, allow_download=allow_download)
    message = str(info.value)
    _message_says_what_and_how(message, model)
    if allow_download:
        assert "downloading 'nobody-here/kosmos-2-missing' from the hub" in message
    else:
        assert "allow_download is false" in message


@pytest.mark.parametrize("allow_download", [True, False])
def test_missing_local_directory(tmp_path: Path, allow_download: bool) -> None:
    model = str(tmp_path / "no_such_model")
    with pytest.raises(ModelNotFound) as info:
        resolve_model(model, allow_download=allow_download)
    _message_says_what_and_how(str(info.value), model, hub=False)
    assert str(tmp_path / "no_such_model") in str(info.value)


@pytest.mark.parametrize("model", ["./no_such_model", "../no/such/model", "~/no_such_model_here", "models/a/b",
                                   "/abs/no_such_model", "no_such_dir/"])
def test_path_that_does_not_exist_is_reported_as_such_without_a_hub_look_up(model: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve_model(model, allow_download=True)
    message = str(info.value)
    _message_says_what_and_how(message, model, hub=False)
    assert "not looked up on the hub" in message and "downloading" not in message


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="is a file, not a directory"):
        resolve_model(str(file))


def test_hub_ids_still_look_like_hub_ids() -> None:
    for model in ("microsoft/kosmos-2-patch14-224", "kosmos-2", "org_1/name.v2"):
        assert not looks_like_path(model), model


def test_pipeline_load_reports_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="Point the package at a local copy"):
        Pipeline.load(Kosmos2Config(backend="torch", model=str(tmp_path / "absent"), allow_download=False))


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="no weights"):
        resolve_model(str(tmp_path))


@pytest.fixture(scope="module")
def pickle_only_dir(tiny_untrained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint re-saved with pickle weights only (pytorch_model.bin)."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("pickle_only")
    for f in tiny_untrained_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    state = {}
    for f in tiny_untrained_dir.glob("*.safetensors"):
        state.update(load_file(str(f)))
    torch.save(state, out / "pytorch_model.bin")
    assert not list(out.glob("*.safetensors"))
    return out


def test_pickle_only_checkpoint_is_refused(pickle_only_dir: Path) -> None:
    with pytest.raises(UnsafeCheckpoint, match="pickle") as info:
        resolve_model(str(pickle_only_dir))
    assert "allow_pickle_weights" in str(info.value)
    with pytest.raises(UnsafeCheckpoint):
        Pipeline.load(Kosmos2Config(backend="torch", model=str(pickle_only_dir), allow_download=False))


def test_pickle_only_checkpoint_loads_when_allowed(pickle_only_dir: Path, tiny_untrained_dir: Path) -> None:
    """Where transformers loads pickle weights (torch >= 2.6); below that (JetPack 6's torch), one clear refusal."""
    if not torch_loads_pickle():
        with pytest.raises(UnsafeCheckpoint, match="transformers loads those only with torch >= 2.6"):
            resolve_model(str(pickle_only_dir), allow_pickle=True)
        return
    assert resolve_model(str(pickle_only_dir), allow_pickle=True) == str(pickle_only_dir)
    frame = Frame(rgb=np.full((50, 70, 3), 128, np.uint8))
    cmd = Command(task="caption", max_new_tokens=5, decoding="free")
    from_pickle = Pipeline.load(Kosmos2Config(backend="torch", model=str(pickle_only_dir), allow_download=False,
                                              allow_pickle_weights=True, device="cpu"))
    from_safe = Pipeline.load(Kosmos2Config(backend="torch", model=str(tiny_untrained_dir), allow_download=False, device="cpu"))
    a, b = from_pickle.run(cmd, frame), from_safe.run(cmd, Frame(rgb=frame.rgb.copy()))
    assert a.status == b.status == Status.OK
    assert a.token_ids == b.token_ids and len(a.token_ids) == 5


def test_good_directory_loads(tiny_untrained_dir: Path) -> None:
    assert resolve_model(str(tiny_untrained_dir)) == str(tiny_untrained_dir)
    assert resolve_model(str(tiny_untrained_dir), allow_download=False) == str(tiny_untrained_dir)
    processor = load_processor(str(tiny_untrained_dir))
    codec = TextCodec(processor)
    ids = codec.encode("<grounding>An image of")
    assert ids.input_ids[0] == processor.tokenizer.bos_token_id
    assert sum(ids.image_mask) == 64
    assert codec.decode(ids.input_ids).endswith("<grounding> An image of")


def test_home_relative_model_path(tiny_untrained_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tiny_untrained_dir.parent))
    assert resolve_model(f"~/{tiny_untrained_dir.name}") == str(tiny_untrained_dir)
