"""Dual encoders from open_clip: inline configs are registered safely, unsafe weights refused."""

from __future__ import annotations

import json
import tempfile

import open_clip
import pytest
import torch

from mmcli.errors import MmcliError
from mmcli.models.encoders import PRESET_DIR, build_dual_encoder, register_config
from mmcli.spec import ModelSpec

NANO = json.loads((PRESET_DIR / "mmcli-nano.json").read_text())


def test_an_inline_config_builds_and_leaves_no_folder_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the system temporary folder, here
    config = {**NANO, "embed_dim": 24}
    encoder = build_dual_encoder(ModelSpec(arch="inline-nano-24", config=config))
    assert encoder.model.text_projection.shape[-1] == 24
    assert open_clip.get_model_config("inline-nano-24")["embed_dim"] == 24  # registered, read at once
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "ABSOLUTE", "x\\y"])
def test_a_config_name_that_is_a_path_is_refused_and_nothing_is_written(tmp_path, monkeypatch, name):
    # The temporary folder is moved inside tmp_path, so that even a failing run writes nowhere else.
    temp = tmp_path / "t" / "u"
    temp.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    name = str(tmp_path / "abs") if name == "ABSOLUTE" else name
    with pytest.raises(MmcliError, match="model.arch: .* is not a model name"):
        register_config(name, NANO)
    assert list(tmp_path.rglob("*.json")) == []
    assert list(temp.iterdir()) == []  # no registration folder either


def test_a_config_without_the_open_clip_keys_is_named():
    with pytest.raises(MmcliError, match="model.config: not an open_clip model config .*vision_cfg"):
        register_config("half-config", {"embed_dim": 8, "text_cfg": {}})


class _Payload:
    def __reduce__(self):
        return (print, ("this would run at load time",))


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_a_pickle_that_weights_only_refuses_is_a_one_line_error(tmp_path, suffix):
    path = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(MmcliError) as info:
        build_dual_encoder(ModelSpec(arch="mmcli-nano", pretrained=str(path)))
    message = str(info.value)
    assert message.startswith(f"model.pretrained: {path}: refused") and "weights_only=True" in message
    assert "Unsupported global" in message and "\n" not in message
