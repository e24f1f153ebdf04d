"""mmcli serve's page (``mmcli/serving/page.html``) in a real browser: headless Chromium, driven by
Playwright, against the real app served by uvicorn on a local port.

The page must show what the server answers (same rows, same order, scores to 3 decimals), its
thumbnails must really decode, an indexed image must find its own row first, "more like this"
must put the clicked row first, a refused query must show the server's message, and a server
with a token must ask for it once and send it on every request, images included.

Needs Playwright for Python and a Chromium executable (Debian's ``/usr/bin/chromium``, or the one
``MMCLI_CHROMIUM`` names); skipped, with the reason, without them. ``MMCLI_SCREENSHOT=PATH`` also
saves a screenshot of a text search, of the index ``MMCLI_SCREENSHOT_INDEX`` names (default: the
tests' random-model index); the README's ``docs/images/serve.png`` is::

    MMCLI_SCREENSHOT=docs/images/serve.png MMCLI_SCREENSHOT_INDEX=shapes-test=emb-test.npy \
        .venv/bin/python -m pytest tests/serving/test_browser.py -k screenshot

after ``mmcli embed data/shapes/test.jsonl --model runs/shapes --out emb-test.npy``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from mmcli.commands.embed import run as embed
from mmcli.retrieval import index as ix
from tests.serving.conftest import serving

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
expect = sync_api.expect
expect.set_options(timeout=20_000)  # generous: the suite shares two cores with the model and the browser

CHROMIUM = os.environ.get("MMCLI_CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium executable at {CHROMIUM} (set MMCLI_CHROMIUM)"
)

TOKEN = "s3cret"
QUERY = "a red circle"
# urllib would otherwise route these local requests through a proxy named in the environment
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def index_path(shapes_dir, nano_run, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("serve-index") / "emb.npy")
    embed(str(shapes_dir / "images"), out, model=str(nano_run), workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def service(index_path):
    from mmcli.serving.service import SearchService

    service = SearchService.open({"shapes": index_path}, device="cpu")
    yield service
    service.close()


@pytest.fixture(scope="module")
def base_url(service) -> Iterator[str]:
    from mmcli.serving.app import create_app

    with serving(create_app(service, token=None)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    with watched_page(browser) as page:
        yield page


@contextmanager
def watched_page(browser):
    """A fresh page (own session storage); fails the test on a script error or on any request that
    leaves the local server (the page must be self-contained)."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    errors, foreign = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: _check_local(request.url, foreign))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"script errors on the page: {errors}"
    assert not foreign, f"the page fetched from another host: {foreign}"


def _check_local(url: str, foreign: list[str]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("data", "blob") and parts.hostname != "127.0.0.1":
        foreign.append(url)


def get_json(url: str, path: str):
    with _LOCAL.open(url + path, timeout=5) as response:
        return json.load(response)


def post_json(url: str, path: str, body: dict) -> tuple[int, dict]:
    """The status and JSON answer of a POST, errors included."""
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with _LOCAL.open(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def status_of(url: str) -> int:
    try:
        with _LOCAL.open(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def cards(page) -> list[dict]:
    """What each result card shows: row, score text, item text and the item's tooltip."""
    return page.eval_on_selector_all(
        "[data-testid=result-card]",
        """cards => cards.map(c => ({
            row: Number(c.dataset.row),
            score: c.querySelector("[data-testid=score]").textContent,
            item: c.querySelector("[data-testid=item]").textContent,
            title: c.querySelector("[data-testid=item]").title,
        }))""",
    )


def expected_cards(answer: dict) -> list[dict]:
    return [
        {"row": hit["row"], "score": f"{hit['score']:.3f}", "item": hit["item"], "title": hit["path"]}
        for hit in answer["results"]
    ]


def image_widths(page) -> list[int]:
    """The decoded width of every result's image, once each has loaded or failed."""
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('[data-testid=result-image]')).every(img => img.complete)"
    )
    return page.eval_on_selector_all("[data-testid=result-image]", "imgs => imgs.map(img => img.naturalWidth)")


def finished(query: str, n: int = 12) -> re.Pattern:
    """The status line once a search for ``query`` (as the page describes it) has shown its results."""
    return re.compile(rf"^{n} results for {re.escape(query)} in [\d.]+ ms$")


def search_text(page, text: str = QUERY) -> None:
    page.get_by_test_id("query").fill(text)
    page.get_by_test_id("query").press("Enter")


def test_text_search_shows_the_servers_results_with_rendered_images(page, base_url, shapes_dir):
    count = len(list((shapes_dir / "images").rglob("*.png")))
    page.goto(base_url)
    expect(page.get_by_test_id("index-name")).to_have_text("shapes")
    expect(page.get_by_test_id("index-size")).to_contain_text(f"{count} items")

    search_text(page)
    expect(page.get_by_test_id("status")).to_have_text(finished(f"“{QUERY}”"))
    code, answer = post_json(base_url, "/api/search", {"index": "shapes", "text": QUERY, "k": 12})
    assert code == 200
    assert cards(page) == expected_cards(answer)
    widths = image_widths(page)
    assert len(widths) == 12 and all(w > 0 for w in widths), widths


def test_an_indexed_image_finds_its_own_row_first_by_picker_and_by_drop(page, base_url, shapes_dir, index_path):
    items = ix.open_index(index_path).items
    page.goto(base_url)
    expect(page.get_by_test_id("index-name")).to_have_text("shapes")

    page.get_by_test_id("file-input").set_input_files(shapes_dir / "images" / "test" / "test-000003.png")
    expect(page.get_by_test_id("status")).to_have_text(finished("the image test-000003.png"))
    first = cards(page)[0]
    assert (first["row"], first["item"], first["score"]) == (
        items.index("test/test-000003.png"),
        "test/test-000003.png",
        "1.000",
    )

    dropped = shapes_dir / "images" / "val" / "val-000005.png"
    transfer = page.evaluate_handle(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            return transfer;
        }""",
        [dropped.name, base64.b64encode(dropped.read_bytes()).decode()],
    )
    zone = page.get_by_test_id("drop-zone")
    zone.dispatch_event("dragenter", {"dataTransfer": transfer})
    assert "dragging" in page.eval_on_selector("body", "b => b.className")
    zone.dispatch_event("drop", {"dataTransfer": transfer})
    expect(page.get_by_test_id("status")).to_have_text(finished("the image val-000005.png"))
    first = cards(page)[0]
    assert (first["row"], first["item"], first["score"]) == (
        items.index("val/val-000005.png"),
        "val/val-000005.png",
        "1.000",
    )
    assert "dragging" not in page.eval_on_selector("body", "b => b.className")


def test_more_like_this_puts_the_clicked_row_first(page, base_url):
    page.goto(base_url)
    search_text(page)
    expect(page.get_by_test_id("status")).to_have_text(finished(f"“{QUERY}”"))
    clicked = cards(page)[4]
    page.get_by_test_id("more-like-this").nth(4).click()
    expect(page.get_by_test_id("status")).to_have_text(finished(f"more like {clicked['item']}"))
    _, answer = post_json(base_url, "/api/search", {"index": "shapes", "row": clicked["row"], "k": 12})
    shown = cards(page)
    assert shown == expected_cards(answer)
    assert (shown[0]["row"], shown[0]["score"]) == (clicked["row"], "1.000")


def test_a_refused_query_shows_the_servers_message(page, base_url):
    code, answer = post_json(base_url, "/api/search", {"index": "shapes", "text": QUERY, "k": 0})
    assert 400 <= code < 500 and isinstance(answer["detail"], str), (code, answer)
    page.goto(base_url)
    expect(page.get_by_test_id("index-name")).to_have_text("shapes")
    page.get_by_test_id("k").fill("0")
    page.get_by_test_id("query").fill(QUERY)
    with page.expect_response(lambda response: response.url.endswith("/api/search")) as response:
        page.get_by_test_id("search-button").click()
    assert response.value.status == code
    expect(page.get_by_test_id("status")).to_have_text(answer["detail"])
    expect(page.get_by_test_id("status")).to_have_attribute("data-state", "error")


def test_a_token_is_asked_for_once_and_sent_with_every_request(browser, service):
    from mmcli.serving.app import create_app

    with serving(create_app(service, token=TOKEN)) as url, watched_page(browser) as page:
        assert status_of(f"{url}/api/thumbnail/shapes/0") == 401
        page.goto(url)
        token = page.get_by_test_id("token-input")
        expect(token).to_be_visible()
        token.fill("wrong")
        token.press("Enter")
        expect(page.get_by_test_id("token-form")).to_contain_text("refused")
        token.fill(TOKEN)
        page.get_by_test_id("token-button").click()
        expect(page.get_by_test_id("index-name")).to_have_text("shapes")
        expect(page.get_by_test_id("token-form")).to_be_hidden()

        search_text(page)
        expect(page.get_by_test_id("status")).to_have_text(finished(f"“{QUERY}”"))
        widths = image_widths(page)  # the thumbnails load only with ?token=
        assert len(widths) == 12 and all(w > 0 for w in widths), widths

        page.reload()  # the session keeps the token: no second prompt
        expect(page.get_by_test_id("index-name")).to_have_text("shapes")
        expect(page.get_by_test_id("token-form")).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('mmcli-token')") == TOKEN


@pytest.mark.skipif(not os.environ.get("MMCLI_SCREENSHOT"), reason="set MMCLI_SCREENSHOT=PATH to take the screenshot")
def test_screenshot(browser, index_path):
    from mmcli.commands.serve import parse_indexes
    from mmcli.serving.app import create_app
    from mmcli.serving.service import SearchService

    named = parse_indexes([os.environ.get("MMCLI_SCREENSHOT_INDEX", f"shapes={index_path}")])
    service = SearchService.open(named, device="cpu")
    with serving(create_app(service)) as url, watched_page(browser) as page:
        page.set_viewport_size({"width": 1100, "height": 760})
        page.goto(url)
        expect(page.get_by_test_id("index-name")).to_have_text(next(iter(named)))
        search_text(page, "a red circle above a blue square")
        expect(page.get_by_test_id("status")).to_have_text(re.compile(r"^\d+ results"))
        assert all(w > 0 for w in image_widths(page))
        Path(os.environ["MMCLI_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=os.environ["MMCLI_SCREENSHOT"])
    service.close()
