"""The HTTP face of :class:`~mmcli.serving.service.SearchService`: a FastAPI app.

- ``/`` the search page (one self-contained HTML file), ``/docs`` the OpenAPI page, ``/health``.
- ``/api/...``: search by text, by an index row ("more like this"), by a client's vector, by an
  uploaded image, in batches; thumbnails and the images of rows.
- clip-retrieval's ``/indices-list``, ``/knn-service`` and ``/metadata``, with its request and
  response fields, so that its ``ClipClient`` and front end query mmcli unchanged.

Every refusal is a 4xx JSON ``{"detail": "one line"}``; an unexpected error is a 500 with a fixed
message (the traceback goes to the server's log, never to the client). With a ``token``, every
data endpoint wants ``Authorization: Bearer TOKEN`` (or ``?token=`` on image URLs, which a browser's
``<img>`` cannot send headers for).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from importlib import resources
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, model_validator
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmcli import __version__
from mmcli.errors import MmcliError
from mmcli.serving.service import (
    MAX_K,
    MAX_UPLOAD_BYTES,
    NotFound,
    SearchService,
    ServedIndex,
    TooLarge,
    check_k,
)

log = logging.getLogger("mmcli.serve")

MAX_BATCH = 256
"""The most queries one batch request may hold."""

MAX_BODY_BYTES = MAX_UPLOAD_BYTES * 4 // 3 + (1 << 20)
"""The largest request body: an upload as base64 (``/knn-service``) and room for the other fields."""

PUBLIC_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
"""Paths that hold no data: served without the token."""


class ApiError(Exception):
    """A refusal with an HTTP status and a one-line message."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Query_(BaseModel):
    """One query: exactly one of ``text``, ``row`` (an index row: "more like this") or ``vector``."""

    text: str | None = Field(None, description="A text, encoded by the index's model.")
    row: int | None = Field(None, ge=0, description="A row of the index, searched with its stored embedding.")
    vector: list[float] | None = Field(None, description="An embedding of the index's dimension.")

    @model_validator(mode="after")
    def _one(self) -> Query_:
        given = [n for n in ("text", "row", "vector") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, row, vector (got {', '.join(given) or 'none'})")
        return self


class SearchRequest(Query_):
    """``POST /api/search``."""

    index: str | None = Field(None, description="Index name (default: the first served).")
    k: int = Field(10, ge=1, le=MAX_K, description="Results per query.")
    threshold: float | None = Field(None, ge=-1, le=1, description="Drop hits whose cosine is below this.")


class BatchRequest(BaseModel):
    """``POST /api/search/batch``: several queries against one index, answered in order."""

    index: str | None = None
    queries: list[Query_] = Field(..., min_length=1, max_length=MAX_BATCH)
    k: int = Field(10, ge=1, le=MAX_K)
    threshold: float | None = Field(None, ge=-1, le=1)


class KnnRequest(BaseModel):
    """clip-retrieval's ``/knn-service`` request (fields it sends that mmcli has no use for are ignored)."""

    text: str | None = None
    image: str | None = Field(None, description="The image file, base64-encoded.")
    image_url: str | None = None
    embedding_input: list[float] | None = None
    modality: str = "image"
    num_images: int = Field(40, ge=1, le=MAX_K)
    num_result_ids: int | None = Field(None, ge=1)
    indice_name: str | None = None
    deduplicate: bool = False


class MetadataRequest(BaseModel):
    """clip-retrieval's ``/metadata`` request."""

    ids: list[int] = Field(..., max_length=MAX_K)
    indice_name: str | None = None


def create_app(service: SearchService, *, token: str | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The FastAPI app serving ``service``.

    ``token`` (if any) guards every data endpoint; ``allowed_hosts`` (if given) are the only names a
    request's ``Host`` may carry (``mmcli serve`` on loopback passes its own names: a web page that
    rebinds its DNS name to 127.0.0.1 is refused). See :class:`_Guard`.
    """
    app = FastAPI(
        title="mmcli serve",
        version=__version__,
        description="Search image and text embedding indexes made by `mmcli embed`.",
    )
    _install_error_handlers(app)
    app.add_middleware(_Guard, token=token, allowed_hosts=allowed_hosts, max_body=MAX_BODY_BYTES)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(resources.files("mmcli.serving").joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/health", summary="Liveness, and the served indexes with their sizes")
    def health() -> dict[str, Any]:
        return {"status": "ok", "indexes": {name: len(s.index) for name, s in service.served.items()}}

    @app.get("/api/indexes", summary="The served indexes")
    def indexes() -> list[dict[str, Any]]:
        return [s.describe() for s in service.served.values()]

    # The search endpoints are async: they await the batchers' futures instead of holding a thread
    # each, and return their JSON directly (FastAPI's generic encoder costs more than the search).

    @app.post("/api/search", summary="Search by a text, an index row or a vector")
    async def search(body: SearchRequest) -> JSONResponse:
        start = time.perf_counter()
        served = service.get(body.index)
        vectors = await _vectors(service, served, [body])
        results = (await _search(service, served, vectors, k=body.k, threshold=body.threshold))[0]
        return JSONResponse(_answer(served, body.k, _query_echo(body), results, start))

    @app.post("/api/search/batch", summary="Several queries against one index")
    async def search_batch(body: BatchRequest) -> JSONResponse:
        start = time.perf_counter()
        served = service.get(body.index)
        vectors = await _vectors(service, served, body.queries)
        found = await _search(service, served, vectors, k=body.k, threshold=body.threshold)
        answers = [_answer(served, body.k, _query_echo(q), r, start) for q, r in zip(body.queries, found)]
        return JSONResponse({"index": served.name, "ms": _ms(start), "answers": answers})

    @app.post("/api/search/image", summary="Search by an uploaded image")
    async def search_image(
        file: Annotated[UploadFile, File(description="The image file.")],
        index: Annotated[str | None, Form()] = None,
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        threshold: Annotated[float | None, Form(ge=-1, le=1)] = None,
    ) -> JSONResponse:
        start = time.perf_counter()
        served = service.get(index)
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        name = file.filename or "upload"
        vectors = await _in_thread(service.encode_image, served, data, name=name)
        results = (await _search(service, served, vectors, k=k, threshold=threshold))[0]
        return JSONResponse(_answer(served, k, {"image": name}, results, start))

    @app.get("/api/thumbnail/{index}/{row}", summary="A thumbnail of a row's image")
    def thumbnail(index: str, row: int, size: Annotated[int, Query(ge=16, le=512)] = 256) -> Response:
        data, media_type = service.thumbnail(service.get(index), row, size)
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/image/{index}/{row}", summary="The image file of a row")
    def image(index: str, row: int) -> FileResponse:
        return FileResponse(service.image_file(service.get(index), row))

    # clip-retrieval's back end -------------------------------------------------------------------

    @app.get("/indices-list", summary="clip-retrieval: the index names")
    def indices_list() -> list[str]:
        return list(service.served)

    @app.post(
        "/knn-service",
        summary="clip-retrieval: nearest neighbours of a text, image or embedding",
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": KnnRequest.model_json_schema()}}}},
    )
    async def knn_service(request: Request) -> JSONResponse:
        # ClipClient posts JSON without a content type, as Flask's get_json(force=True) accepts: read it as such.
        body = _parse(KnnRequest, await request.body())
        served = service.get(body.indice_name)
        if body.modality != served.index.meta["modality"]:
            raise ApiError(
                400,
                f"modality: index {served.name!r} holds {served.index.meta['modality']} embeddings, "
                f"not {body.modality}",
            )
        vectors = await _knn_vectors(service, served, body)
        # As clip-retrieval does: num_result_ids candidates, deduplicated, then the first num_images.
        candidates = min(max(body.num_images, body.num_result_ids or 0), MAX_K)
        found = await _search(service, served, vectors, k=candidates, deduplicate=body.deduplicate)
        return JSONResponse([_clip_retrieval_hit(served, hit, request) for hit in found[0][: body.num_images]])

    @app.post(
        "/metadata",
        summary="clip-retrieval: the metadata of index rows",
        openapi_extra={
            "requestBody": {"content": {"application/json": {"schema": MetadataRequest.model_json_schema()}}}
        },
    )
    async def metadata(request: Request) -> list[dict[str, Any]]:
        body = _parse(MetadataRequest, await request.body())
        served = service.get(body.indice_name)
        for row in body.ids:
            service.check_row(served, row)
        hits = service.describe_hits(served, [(0.0, row) for row in body.ids])
        out = []
        for hit in hits:
            meta = _clip_retrieval_hit(served, hit, request)
            meta.pop("similarity")
            out.append({"id": meta.pop("id"), "metadata": meta})
        return out

    return app


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


async def _vectors(service: SearchService, served: ServedIndex, queries: list[Query_]):
    import numpy as np

    rows: list = [None] * len(queries)
    texts = [(n, q.text) for n, q in enumerate(queries) if q.text is not None]
    if texts:
        encoded = await asyncio.wrap_future(service.encode_texts(served, [t for _, t in texts]))
        for (n, _), vector in zip(texts, encoded):
            rows[n] = vector
    for n, q in enumerate(queries):
        if q.row is not None:
            rows[n] = service.row_vectors(served, [q.row])[0]
        elif q.vector is not None:
            rows[n] = service.check_vectors(served, [q.vector])[0]
    return np.stack(rows).astype(np.float32)


async def _search(service: SearchService, served: ServedIndex, vectors, *, k: int, **options) -> list[list[dict]]:
    check_k(k)
    scores, ids = await asyncio.wrap_future(served.search(vectors, k))
    return service.hits(served, scores, ids, **options)


async def _knn_vectors(service: SearchService, served: ServedIndex, body: KnnRequest):
    given = [n for n in ("text", "image", "image_url", "embedding_input") if getattr(body, n)]
    if len(given) != 1:
        raise ApiError(400, f"give exactly one of text, image, image_url, embedding_input (got {', '.join(given)})")
    if body.image_url:
        raise ApiError(400, "image_url: this server fetches nothing from the network; send the image as base64")
    if body.text:
        return await asyncio.wrap_future(service.encode_texts(served, [body.text]))
    if body.embedding_input:
        return service.check_vectors(served, [body.embedding_input])
    try:
        data = base64.b64decode(body.image, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image: not valid base64") from None
    return await _in_thread(service.encode_image, served, data, name="image")


def _clip_retrieval_hit(served: ServedIndex, hit: dict[str, Any], request: Request) -> dict[str, Any]:
    out = {"id": hit["row"], "similarity": hit["score"], "caption": hit["caption"], "item": hit["item"]}
    if served.has_images:
        out["url"] = str(request.url_for("image", index=served.name, row=str(hit["row"])))
        out["image_path"] = hit["path"]
    return {**hit["metadata"], **out}


def _answer(served, k: int, query: dict, results: list[dict], start: float) -> dict[str, Any]:
    if served.has_images:
        for hit in results:
            hit["thumbnail"] = f"/api/thumbnail/{served.name}/{hit['row']}"
            hit["image"] = f"/api/image/{served.name}/{hit['row']}"
    return {
        "index": served.name,
        "count": len(served.index),
        "k": k,
        "search": served.method["method"],
        "ms": _ms(start),
        "query": query,
        "results": results,
    }


def _query_echo(q: Query_) -> dict[str, Any]:
    if q.text is not None:
        return {"text": q.text}
    if q.row is not None:
        return {"row": q.row}
    return {"vector": len(q.vector or [])}


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def _parse(model: type[BaseModel], raw: bytes):
    try:
        data = json.loads(raw or b"null")
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, _validation_line(exc.errors())) from None


async def _in_thread(func, *args, **kwargs):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(func, *args, **kwargs)


def _validation_line(errors: list[dict]) -> str:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where or 'request'}: {first.get('msg', 'invalid')}{more}"


class _Guard:
    """ASGI middleware that refuses a request before the app reads a byte of its body when its
    ``Host`` is not an allowed name (DNS rebinding), it comes from another site's page (an
    ``Origin`` other than the server's own), the bearer token is missing or wrong (data endpoints),
    or its body is announced larger than :data:`MAX_BODY_BYTES`; and cuts a body sent without a
    length when it passes that size, answering 413 instead of the app.
    """

    def __init__(self, app, *, token: str | None, allowed_hosts: list[str] | None, max_body: int):
        self.app, self.token, self.max_body = app, token, max_body
        self.allowed = None if allowed_hosts is None else {h.strip("[]").lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope, Headers(scope=scope))
        if refusal is not None:
            await _reply(*refusal)(scope, receive, send)
            return
        state = {"bytes": 0, "over": False, "replied": False}

        async def counted() -> dict:
            message = await receive()
            state["bytes"] += len(message.get("body", b""))
            if state["bytes"] > self.max_body:
                state["over"] = True
                raise TooLarge(f"request body over {self.max_body} bytes")
            return message

        async def answer(message: dict) -> None:
            if not state["over"]:
                await send(message)
            elif not state["replied"]:  # whatever the app made of the cut body, the client gets a 413
                state["replied"] = True
                await _reply(413, f"request body over {self.max_body} bytes; uploads are limited")(scope, receive, send)

        await self.app(scope, counted, answer)

    def _refusal(self, scope, headers: Headers) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if self.allowed is not None and _host_name(host) not in self.allowed:
            return 400, f"Host {host!r} is not a name of this server"
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return 403, "requests from another site's page are refused"
        if self.token is not None and scope["path"] not in PUBLIC_PATHS:
            auth = headers.get("authorization", "")
            given = (
                auth[7:] if auth.lower().startswith("bearer ") else QueryParams(scope["query_string"]).get("token", "")
            )
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return 401, "a bearer token is required (Authorization: Bearer TOKEN)"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return 413, f"request body of {int(length)} bytes; uploads are limited to {MAX_UPLOAD_BYTES} bytes"
        return None


def _host_name(host: str) -> str:
    """The name of a ``Host`` header, without its port (``[::1]:8000`` → ``::1``)."""
    if host.startswith("["):
        return host[1 : host.find("]")].lower() if "]" in host else host.lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


def _reply(status: int, detail: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    reply = _reply

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return reply(exc.status, exc.detail)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return reply(404, str(exc))

    @app.exception_handler(TooLarge)
    async def too_large(request: Request, exc: TooLarge) -> JSONResponse:
        return reply(413, str(exc))

    @app.exception_handler(MmcliError)
    async def refused(request: Request, exc: MmcliError) -> JSONResponse:
        return reply(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return reply(422, _validation_line(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return reply(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return reply(500, "internal error (details in the server's log)")
