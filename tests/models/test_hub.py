"""Hub weights offline: the cache is read without the network, the hub is asked once, and the
error is one line saying what to download and where (no network is used by these tests)."""

from __future__ import annotations

import huggingface_hub
import huggingface_hub.utils
import pytest
import requests
from huggingface_hub import constants

from mmcli.errors import MmcliError
from mmcli.models import hub

REPO = "timm/vit_base_patch32_clip_224.openai"


class _Offline:
    """A requests session whose every HEAD fails as DNS does offline; counts the tries."""

    def __init__(self):
        self.urls: list[str] = []

    def head(self, url, **kwargs):
        self.urls.append(url)
        raise requests.ConnectionError(f"HTTPSConnectionPool: Failed to resolve 'huggingface.co' ({url})")


@pytest.fixture
def offline(monkeypatch):
    session = _Offline()
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: session)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, name, **kw: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_download(*args, **kwargs):
        raise AssertionError("hf_hub_download must not be called when the hub did not answer")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    return session


def _message(what: str, download: str, cause: str = "Failed to resolve") -> str:
    return (
        f"model.pretrained: {what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
        f"cannot be reached ({cause}); on a connected machine run `{download}` and copy its cache folder here "
        f"(or point HF_HUB_CACHE at it), or use a local run folder (runs/NAME) or weights file"
    )


def test_an_open_clip_tag_offline_is_one_try_and_one_line(offline):
    with pytest.raises(MmcliError) as err:
        hub.local_weights("ViT-B-32", "openai")
    assert str(err.value) == _message("ViT-B-32:openai", f"hf download {REPO} open_clip_pytorch_model.bin")
    assert offline.urls == [f"https://huggingface.co/{REPO}/resolve/main/open_clip_model.safetensors"]


def test_an_hf_hub_id_offline_is_one_try_and_one_line(offline):
    with pytest.raises(MmcliError) as err:
        hub.local_weights("hf-hub:org/model", None)
    assert str(err.value) == _message("hf-hub:org/model", "hf download org/model")
    assert len(offline.urls) == 1


def test_hf_hub_offline_asks_nothing(offline, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MmcliError) as err:
        hub.local_weights("ViT-B-32", "openai")
    assert "(HF_HUB_OFFLINE is set)" in str(err.value) and offline.urls == []


def test_cached_weights_are_used_without_the_network(offline, monkeypatch, tmp_path):
    cached = {(REPO, "open_clip_pytorch_model.bin"): str(tmp_path / "w.bin")}
    monkeypatch.setattr(
        huggingface_hub, "try_to_load_from_cache", lambda repo_id, name, **kw: cached.get((repo_id, name))
    )
    import open_clip

    entry = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    try:
        assert hub.local_weights("ViT-B-32", "openai") == ("ViT-B-32", "openai")
        assert entry["file"] == str(tmp_path / "w.bin")  # open_clip loads it, with the tag's settings
    finally:
        entry.pop("file", None)
    snapshot = tmp_path / "snapshot"
    cached = {("org/model", hub.HUB_CONFIG): str(snapshot / hub.HUB_CONFIG)}
    cached[("org/model", hub.HUB_WEIGHTS[0])] = str(snapshot / hub.HUB_WEIGHTS[0])
    assert hub.local_weights("hf-hub:org/model", None) == (f"local-dir:{snapshot}", None)
    assert offline.urls == []


def test_local_files_and_no_weights_pass_through(offline, tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert hub.local_weights("mmcli-nano", str(weights)) == ("mmcli-nano", str(weights))
    assert hub.local_weights("mmcli-nano", None) == ("mmcli-nano", None)
    assert offline.urls == []


def test_building_a_model_with_a_hub_tag_offline_fails_before_building(offline):
    from mmcli.models.encoders import build_dual_encoder
    from mmcli.spec import ModelSpec

    with pytest.raises(MmcliError, match=r"^model.pretrained: ViT-B-32:openai is not in the Hugging Face cache"):
        build_dual_encoder(ModelSpec(arch="ViT-B-32", pretrained="openai"))
    assert len(offline.urls) == 1
