"""A live server for the tests that need real HTTP (the browser, clip-retrieval's ClipClient)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

# urllib would otherwise route these local requests through a proxy named in the environment
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextmanager
def serving(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free local port in a background thread; yield its base URL
    once ``/health`` answers."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound here, so the port is known before the server starts
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with _LOCAL.open(url + "/health", timeout=5) as response:
                    if json.load(response)["status"] == "ok":
                        break
            except OSError:
                pass
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
