"""The default model: --model, then $MMCLI_MODEL, then the config file, then ViT-B-32 (LAION-2B) from
the Hugging Face cache; offline with nothing cached, one line. Nothing here touches the network:
every test runs with HF_HUB_OFFLINE=1 and a temporary HF_HOME, where a small file stands for the
downloaded weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmcli.errors import MmcliError
from mmcli.models import defaults
from mmcli.models.defaults import DEFAULT_MODEL, DEFAULT_REPO, WEIGHT_FILES

REPO_DIR = "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"


@pytest.fixture
def home(monkeypatch, tmp_path) -> Path:
    """A user with no MMCLI_MODEL, no config file, an empty Hugging Face cache and no network."""
    from huggingface_hub import constants

    for name in ("MMCLI_MODEL", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)  # restored after the test
    monkeypatch.setattr(defaults, "hub_reachable", lambda timeout=3.0: pytest.fail("probed the network"))
    return tmp_path


def place_weights(home: Path, snapshot: str = "main", name: str = WEIGHT_FILES[0], ref: str | None = None) -> Path:
    """A stand-in weights file in the cache, as the offline message says (``snapshots/main``) or as
    huggingface_hub's download leaves it (``snapshots/<commit>`` and ``refs/main`` naming it)."""
    repo = home / "hf" / "hub" / REPO_DIR
    path = repo / "snapshots" / snapshot / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not really weights")
    if ref is not None:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(ref)
    return path


def write_config(home: Path, text: str) -> Path:
    path = home / "config" / "mmcli" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_names_are_open_clips():
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    arch, tag = DEFAULT_MODEL.split(":")
    assert open_clip.get_pretrained_cfg(arch, tag)["hf_hub"] == DEFAULT_REPO + "/"
    assert WEIGHT_FILES == (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)


def test_resolution_order_environment_then_config_then_cached_default(home, monkeypatch):
    place_weights(home, "a" * 40, ref="a" * 40)
    write_config(home, 'model = "~/runs/from-config"\nother = 1\n')
    monkeypatch.setenv("MMCLI_MODEL", "runs/from-env")
    assert defaults.default_model() == "runs/from-env"
    monkeypatch.delenv("MMCLI_MODEL")
    assert defaults.default_model() == os.path.expanduser("~/runs/from-config")
    write_config(home, "# no model here\n")
    assert defaults.default_model() == DEFAULT_MODEL


def test_xdg_config_home_falls_back_to_dot_config(home, monkeypatch):
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(home / "user"))
    assert defaults.config_path() == home / "user" / ".config" / "mmcli" / "config.toml"


def test_a_downloaded_file_is_found_where_huggingface_hub_put_it_and_read_offline(home):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    path = place_weights(home, commit, ref=commit)
    assert defaults.cached_default_weights() == path
    defaults.check_default_weights()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True


def test_the_pytorch_file_is_found_when_there_is_no_safetensors(home):
    path = place_weights(home, "main", name=WEIGHT_FILES[1])
    assert defaults.cached_default_weights() == path


def test_offline_without_the_weights_is_one_line_naming_where_to_put_them(home):
    with pytest.raises(MmcliError) as caught:
        defaults.default_model()
    message = str(caught.value)
    place = home / "hf" / "hub" / REPO_DIR / "snapshots" / "main" / "open_clip_model.safetensors"
    assert message == (
        "no --model given and the default model ViT-B-32:laion2b_s34b_b79k is not downloaded (offline): "
        "pass --model runs/NAME (or ARCH:WEIGHTS_FILE), set MMCLI_MODEL=runs/NAME, or put "
        "open_clip_model.safetensors from https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K "
        f"at {place}"
    )
    assert "\n" not in message


def test_a_file_put_where_the_message_says_is_what_open_clip_loads(home):
    # The message's path, then open_clip's own hub lookup (huggingface_hub's download, offline)
    # must land on that very file: the ref written beside it is what makes the download find it.
    from huggingface_hub import constants
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    with pytest.raises(MmcliError, match="not downloaded"):
        defaults.default_model()
    place = Path(defaults.offline_message().rsplit(" at ", 1)[1])
    place.parent.mkdir(parents=True)
    place.write_bytes(b"not really weights")
    assert defaults.default_model() == DEFAULT_MODEL
    assert constants.HF_HUB_OFFLINE is True
    cfg = get_pretrained_cfg(*DEFAULT_MODEL.split(":"))
    assert Path(download_pretrained(cfg, cache_dir=str(defaults.hub_cache_dir()))) == place


def test_config_file_mistakes_are_one_line(home):
    path = write_config(home, "model = [1, 2]\n")
    with pytest.raises(MmcliError, match=f"^{path}: model must be a string"):
        defaults.default_model()
    write_config(home, "model = \n")
    with pytest.raises(MmcliError, match=f"^{path}: not a readable TOML file"):
        defaults.default_model()


def test_embed_without_model_uses_the_environments_run(home, monkeypatch, nano_run, shapes_dir, tmp_path):
    from mmcli.commands.embed import run as embed
    from mmcli.retrieval import index as ix

    monkeypatch.setenv("MMCLI_MODEL", str(nano_run))
    out = tmp_path / "emb.npy"
    embed(str(shapes_dir / "images" / "val"), str(out), workers=0, progress=False)
    assert ix.open_index(str(out)).meta["model"]["ref"] == str(nano_run.resolve())


def test_embed_without_model_loads_the_cached_default(home, monkeypatch, nano_run, shapes_dir, tmp_path):
    # The construction of ViT-B-32 itself is replaced (no real weights here): what is checked is
    # that embed asks for the default once its cached file is found, with the hub set offline.
    from huggingface_hub import constants

    from mmcli.models import loading

    place_weights(home, "b" * 40, ref="b" * 40)
    asked = []
    real = loading.load_model

    def load(ref, device="cpu"):
        asked.append((ref, constants.HF_HUB_OFFLINE))
        return real(str(nano_run), device=device)

    monkeypatch.setattr(loading, "load_model", load)
    from mmcli.commands.embed import run as embed

    embed(str(shapes_dir / "images" / "val"), str(tmp_path / "emb.npy"), workers=0, progress=False)
    assert asked == [(DEFAULT_MODEL, True)]


def test_cli_embed_offline_without_a_model_says_what_to_do_in_one_line(home, shapes_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MMCLI_MODEL"}
    r = subprocess.run(
        [sys.executable, "-m", "mmcli", "embed", str(shapes_dir / "images" / "val"), "--out", str(tmp_path / "e.npy")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"mmcli: error: {defaults.offline_message()}"]


def test_eval_without_model_takes_the_default(home, monkeypatch, shapes_dir):
    from mmcli.commands.evaluate import spec_from

    monkeypatch.setenv("MMCLI_MODEL", "runs/somewhere")
    spec = spec_from(None, [], {"retrieval": str(shapes_dir / "test.jsonl")})
    assert spec.model == "runs/somewhere"
    assert spec_from(None, [], {"retrieval": str(shapes_dir / "test.jsonl"), "model": "runs/given"}).model == (
        "runs/given"
    )


def test_the_probe_decides_when_offline_mode_is_not_set(home, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(defaults, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(MmcliError, match="is not downloaded \\(offline\\)"):
        defaults.default_model()
    monkeypatch.setattr(defaults, "hub_reachable", lambda timeout=3.0: True)
    assert defaults.default_model() == DEFAULT_MODEL  # open_clip downloads it when loading


def test_the_probe_connects_to_the_endpoint_or_the_proxy(monkeypatch):
    # Local sockets only: a listening one is reachable, a closed port is not.
    import socket

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert defaults.hub_reachable(timeout=1)
        monkeypatch.setenv("HF_ENDPOINT", "https://unreachable.invalid")
        monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{port}")
        assert defaults.hub_reachable(timeout=1)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    assert not defaults.hub_reachable(timeout=1)
