"""``mmcli serve --index emb.npy``: the indexes behind a REST API and a web page (:mod:`mmcli.serving`)."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from mmcli.errors import MmcliError

TOKEN_VARIABLE = "MMCLI_SERVE_TOKEN"
"""The environment variable a bearer token may come from (a command line is visible to other users)."""


def parse_indexes(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after the file: ``emb.npy`` → ``emb``) → {name: path}."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name.removesuffix(".npy"), spec
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise MmcliError(f"--index {spec}: a name is letters, digits, '-', '_' or '.' (NAME=PATH)")
        if name in out:
            raise MmcliError(f"--index {spec}: the name {name!r} is given twice; name them NAME=PATH")
        out[name] = path
    if not out:
        raise MmcliError("--index: give at least one index (.npy written by embed)")
    return out


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(
    indexes: list[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    use_faiss: bool = False,
    token: str | None = None,
    device: str = "auto",
) -> None:
    """Open the indexes, load their models once, and serve until interrupted."""
    # torch's OpenMP threads spin after each forward pass and starve NumPy's BLAS threads, which
    # score the rows right after: passive waiting took a query from 8.0 to 3.3 ms on 2 cores
    # (benchmarks/serve_load.py). Set before torch is first imported; a user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from mmcli.serving.app import create_app
    from mmcli.serving.service import SearchService

    named = parse_indexes(indexes)
    token = token or os.environ.get(TOKEN_VARIABLE) or None
    if not is_loopback(host):
        guard = "requests need the bearer token" if token else "anyone who can reach it can search and see the images"
        print(f"mmcli serve: warning: listening on {host}, not only this machine: {guard}", file=sys.stderr)
    service = SearchService.open(named, device=device, use_faiss=use_faiss)
    shown = "localhost" if is_loopback(host) else host
    sizes = ", ".join(f"{name} ({len(s.index)} rows, {s.method['method']})" for name, s in service.served.items())
    print(f"mmcli serve: {sizes} at http://{shown}:{port}/ (API: /docs)", file=sys.stderr)
    # On loopback only this machine's names are accepted (a page rebinding its name to 127.0.0.1 is
    # refused); on another address the names a network gives the machine are not known.
    allowed = ["localhost", "127.0.0.1", "::1", host] if is_loopback(host) else None
    try:
        uvicorn.run(create_app(service, token=token, allowed_hosts=allowed), host=host, port=port, log_level="warning")
    finally:
        service.close()
