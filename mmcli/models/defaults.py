"""The model a command uses when ``--model`` is not given, as rclip and clip-retrieval have one.

Order: ``--model``; the ``MMCLI_MODEL`` environment variable; ``model = "…"`` in the user's config
file (``$XDG_CONFIG_HOME/mmcli/config.toml``, else ``~/.config/mmcli/config.toml``); else open_clip's
ViT-B-32 with its LAION-2B weights (:data:`DEFAULT_MODEL`), which open_clip fetches once into the
Hugging Face cache.

Offline with those weights not cached, open_clip's download would retry and warn before failing
with a long traceback. So the cache is looked up first, with huggingface_hub's own lookup
(``try_to_load_from_cache``, the files open_clip's download asks for, in its order), and when the
weights are missing and the hub cannot be reached, one line says what to do. When they are cached,
huggingface_hub is switched to offline mode for this process: a run makes no request at all.

Nothing here imports torch or open_clip: the names below are open_clip's (checked by a test).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from mmcli.errors import MmcliError

DEFAULT_ARCH = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
DEFAULT_MODEL = f"{DEFAULT_ARCH}:{DEFAULT_PRETRAINED}"
"""The model used when none is named: CLIP ViT-B/32 trained on LAION-2B (OpenCLIP), as clip-retrieval's."""

DEFAULT_REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
"""The Hugging Face repository open_clip's pretrained table names for :data:`DEFAULT_MODEL`."""

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""The files open_clip's hub download asks for, in its order (safetensors first)."""

MODEL_ENV = "MMCLI_MODEL"


def default_model() -> str:
    """The model to use when ``--model`` is not given: ``$MMCLI_MODEL``, else the config file's
    ``model``, else :data:`DEFAULT_MODEL` once its weights are known to be at hand or reachable
    (:func:`check_default_weights`)."""
    configured = configured_model()
    if configured is not None:
        return configured
    check_default_weights()
    return DEFAULT_MODEL


def configured_model() -> str | None:
    """``$MMCLI_MODEL``, else ``model`` of the user's config file (:func:`config_path`), else None."""
    env = os.environ.get(MODEL_ENV, "").strip()
    if env:
        return os.path.expanduser(env)
    path = config_path()
    if not path.is_file():
        return None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
        import tomli as tomllib
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MmcliError(f"{path}: not a readable TOML file ({exc})") from None
    model = config.get("model")
    if model is None:
        return None
    if not isinstance(model, str) or not model.strip():
        raise MmcliError(f'{path}: model must be a string, e.g. model = "runs/NAME" or "{DEFAULT_MODEL}"')
    return os.path.expanduser(model.strip())


def config_path() -> Path:
    """``$XDG_CONFIG_HOME/mmcli/config.toml``, else ``~/.config/mmcli/config.toml`` (the XDG rule)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "mmcli" / "config.toml"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, by huggingface_hub's rule, read from the environment now (its own
    constant is fixed when it is imported): ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expanduser(os.path.expandvars(explicit)))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expanduser(os.path.expandvars(home))) / "hub"


def cached_default_weights() -> Path | None:
    """The cached weights file of :data:`DEFAULT_MODEL` that open_clip would load, or None.

    A file put by hand at ``snapshots/main/`` (what the offline message says) is found by
    huggingface_hub's lookup but not by its download, which follows ``refs/main``: that ref is
    written, naming the ``main`` folder, so open_clip's own lookup finds the file too.
    """
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    for name in WEIGHT_FILES:
        found = try_to_load_from_cache(DEFAULT_REPO, name, cache_dir=cache)
        if isinstance(found, str):
            repo = _repo_dir(cache)
            if not (repo / "refs" / "main").is_file() and Path(found).parent == repo / "snapshots" / "main":
                (repo / "refs").mkdir(exist_ok=True)
                (repo / "refs" / "main").write_text("main", encoding="utf-8")
            return Path(found)
    return None


def check_default_weights() -> None:
    """Make sure :data:`DEFAULT_MODEL` can be loaded without a failed download: cached, it is read
    offline (no request); not cached, the hub must be reachable, else one line says what to do."""
    if cached_default_weights() is not None:
        _go_offline()
        return
    if hub_offline() or not hub_reachable():
        raise MmcliError(offline_message())


def offline_message() -> str:
    """The one line shown when no model is named and the default's weights cannot be had."""
    place = _repo_dir(hub_cache_dir()) / "snapshots" / "main" / WEIGHT_FILES[0]
    return (
        f"no --model given and the default model {DEFAULT_MODEL} is not downloaded (offline): "
        f"pass --model runs/NAME (or ARCH:WEIGHTS_FILE), set {MODEL_ENV}=runs/NAME, "
        f"or put {WEIGHT_FILES[0]} from https://huggingface.co/{DEFAULT_REPO} at {place}"
    )


def hub_offline() -> bool:
    """Whether huggingface_hub is told to stay offline (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any((flag or "").strip().upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub (``$HF_ENDPOINT``, else huggingface.co), or to the HTTPS
    proxy when one is set (the hub is then reached through it), opens within ``timeout`` seconds:
    a cheap probe, so that an offline machine gets one line, not retries."""
    proxy = next((os.environ[v] for v in _PROXY_VARIABLES if os.environ.get(v)), None)
    endpoint = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else _endpoint())
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def use_cached_default(ref: str) -> None:
    """Before loading ``ref``: if it is :data:`DEFAULT_MODEL` and its weights are cached, read them
    offline (an index made with the default names it; searching it then makes no request)."""
    if ref == DEFAULT_MODEL and cached_default_weights() is not None:
        _go_offline()


def _go_offline() -> None:
    # huggingface_hub reads HF_HUB_OFFLINE when imported: set both the variable (for what is
    # imported later, and subprocesses such as DataLoader workers) and its constant.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True


def _repo_dir(cache: Path) -> Path:
    return cache / ("models--" + DEFAULT_REPO.replace("/", "--"))
