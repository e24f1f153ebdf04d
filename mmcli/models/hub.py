"""Hub weights (an open_clip tag or an ``hf-hub:`` id): from the cache, or fetched with one try.

open_clip downloads through huggingface_hub, which retries a failed connection five times with
backoff, for each of the two or three file names it tries: offline that is about a minute, thirty
warnings and an error whose cause is cut off. Here the files are found in the Hugging Face cache
without touching the network, or the hub is asked once (one HEAD request, no retries); when it
cannot be reached, one line says which files to download, with what, and where they go.
open_clip then loads the local files (:func:`local_weights`).
"""

from __future__ import annotations

import os
from pathlib import Path

from mmcli.errors import MmcliError

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""The weights files of an ``hf-hub:`` model repository, in the order open_clip prefers them."""
PROBE_TIMEOUT_S = 5.0


class HubUnreachable(Exception):
    """The hub did not answer (no network, DNS failure, timeout, ``HF_HUB_OFFLINE=1``)."""


def local_weights(arch: str, pretrained: str | None) -> tuple[str, str | None]:
    """``(arch, pretrained)`` for open_clip, with hub weights made local (cached, or fetched once).

    An open_clip tag stays a tag, its entry pointed at the cached weights file; an ``hf-hub:`` id
    becomes a ``local-dir:`` of the cached repository (its config, which holds the preprocessing,
    and its weights). Anything else (a local file, no weights, a tag open_clip does not know, a
    tag published only as a URL) is returned unchanged."""
    if arch.startswith(HF_HUB_PREFIX):
        repo_id = arch.removeprefix(HF_HUB_PREFIX)
        what = arch
        config = _cached_or_fetched(repo_id, (HUB_CONFIG,), what, f"hf download {repo_id}")
        _cached_or_fetched(repo_id, HUB_WEIGHTS, what, f"hf download {repo_id}")
        return f"{LOCAL_DIR_PREFIX}{Path(config).parent}", None
    if pretrained is None or Path(pretrained).expanduser().is_file():
        return arch, pretrained
    import open_clip

    tag = open_clip.get_pretrained_cfg(arch, pretrained)  # open_clip's own entry, not a copy
    if not tag.get("hf_hub") or tag.get("file"):
        return arch, pretrained
    repo_id, filename = os.path.split(tag["hf_hub"])
    names = _with_safetensors(filename or HUB_WEIGHTS[1])
    # open_clip's download_pretrained returns an entry's "file" when it has one: the tag keeps its
    # preprocessing and QuickGELU settings (a bare file path would lose them), without a download.
    tag["file"] = _cached_or_fetched(repo_id, names, f"{arch}:{pretrained}", f"hf download {repo_id} {names[-1]}")
    return arch, pretrained


def _with_safetensors(filename: str) -> tuple[str, ...]:
    """``filename`` after its ``.safetensors`` twin, which open_clip tries first (no pickle):
    ``open_clip_model.safetensors`` for ``open_clip_pytorch_model.bin``, else the same stem."""
    if filename == HUB_WEIGHTS[1]:
        return HUB_WEIGHTS
    stem, suffix = os.path.splitext(filename)
    return (f"{stem}.safetensors", filename) if suffix in (".bin", ".pth") else (filename,)


def _cached_or_fetched(repo_id: str, names: tuple[str, ...], what: str, download: str) -> str:
    """The local path of the first of ``names`` in ``repo_id``: cached, else downloaded after one
    HEAD request has found it (the others are alternatives, as ``.safetensors`` for ``.bin``);
    ``download`` is the command that would fetch it, for the message when the hub is out of reach."""
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        cached = try_to_load_from_cache(repo_id, name)
        if isinstance(cached, str):
            return cached
    try:
        for name in names:
            if _exists_on_hub(repo_id, name):
                return _download(repo_id, name)
    except HubUnreachable as exc:
        raise MmcliError(_offline_message(what, download, exc)) from None
    raise MmcliError(f"model.pretrained: {what}: {repo_id} on the Hugging Face hub has none of {', '.join(names)}")


def _exists_on_hub(repo_id: str, name: str) -> bool:
    """Whether the hub has ``name`` in ``repo_id``, asked once (huggingface_hub's own calls retry)."""
    import requests
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    if constants.HF_HUB_OFFLINE:
        raise HubUnreachable("HF_HUB_OFFLINE is set")
    try:
        response = get_session().head(
            hf_hub_url(repo_id, name), headers=build_hf_headers(), timeout=PROBE_TIMEOUT_S, allow_redirects=False
        )
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise HubUnreachable(_cause(exc)) from None
    return response.status_code < 400


def _download(repo_id: str, name: str) -> str:
    """Download ``name`` of ``repo_id`` into the Hugging Face cache (the hub has just answered)."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, name, library_name="mmcli")
    except OSError as exc:  # requests' connection errors are OSErrors: the network went away
        raise HubUnreachable(_cause(exc)) from None


def _cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error ("Name or service not known"), short."""
    text = " ".join(str(exc).split())
    for marker in ("Failed to resolve", "Connection refused", "timed out", "Network is unreachable"):
        if marker in text:
            return marker
    return f"{type(exc).__name__}: {text[:120]}"


def _offline_message(what: str, download: str, exc: HubUnreachable) -> str:
    from huggingface_hub import constants

    return (
        f"model.pretrained: {what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
        f"cannot be reached ({exc}); on a connected machine run `{download}` and copy its cache folder here "
        f"(or point HF_HUB_CACHE at it), or use a local run folder (runs/NAME) or weights file"
    )
