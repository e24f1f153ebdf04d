"""mmcli serve's command: index names, the warning for an address other than loopback, the token
from the environment; uvicorn itself is replaced so that nothing listens."""

from __future__ import annotations

import pytest

from mmcli.commands import serve
from mmcli.commands.embed import run as embed
from mmcli.errors import MmcliError


def test_index_names():
    assert serve.parse_indexes(["a/emb.npy", "photos=b/x.npy"]) == {"emb": "a/emb.npy", "photos": "b/x.npy"}
    with pytest.raises(MmcliError, match="given twice"):
        serve.parse_indexes(["a/emb.npy", "b/emb.npy"])
    with pytest.raises(MmcliError, match="a name is letters"):
        serve.parse_indexes(["my photos=x.npy"])


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
    ],
)
def test_loopback(host, loopback):
    assert serve.is_loopback(host) is loopback


@pytest.fixture(scope="module")
def index(shapes_dir, nano_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serve-cmd") / "emb.npy")
    embed(str(shapes_dir / "images" / "val"), out, model=str(nano_run), workers=0, progress=False)
    return out


def run_without_listening(monkeypatch, index, **kwargs):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    serve.run([index], **kwargs)
    return calls


def test_another_address_is_served_only_with_a_warning(monkeypatch, index, capsys):
    calls = run_without_listening(monkeypatch, index, host="0.0.0.0", port=8123)
    assert calls[0][1]["host"] == "0.0.0.0" and calls[0][1]["port"] == 8123
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err and "anyone who can reach it" in err
    run_without_listening(monkeypatch, index)
    assert "warning" not in capsys.readouterr().err


def test_the_token_comes_from_the_environment(monkeypatch, index):
    from fastapi.testclient import TestClient

    monkeypatch.setenv(serve.TOKEN_VARIABLE, "from-env")
    ((app, _),) = run_without_listening(monkeypatch, index)
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    assert client.get("/api/indexes").status_code == 401
    assert client.get("/api/indexes", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_on_loopback_only_this_machines_names_are_accepted(monkeypatch, index):
    from fastapi.testclient import TestClient

    ((app, _),) = run_without_listening(monkeypatch, index)
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    assert client.get("/api/indexes").status_code == 200
    assert client.get("/api/indexes", headers={"Host": "rebound.example:8000"}).status_code == 400
    ((app, _),) = run_without_listening(monkeypatch, index, host="0.0.0.0")
    assert TestClient(app, base_url="http://my-machine.lan:8000").get("/api/indexes").status_code == 200
