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

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, model_validator
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


def create_app(service: SearchService, *, token: str | None = None) -> FastAPI:
    """The FastAPI app serving ``service``; ``token`` (if any) guards every data endpoint."""
    app = FastAPI(
        title="mmcli serve",
        version=__version__,
        description="Search image and text embedding indexes made by `mmcli embed`.",
    )
    _install_error_handlers(app)
    _limit_request_size(app)
    auth = _token_check(token)
    guarded = [Depends(auth)]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(resources.files("mmcli.serving").joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/health", summary="Liveness, and the served indexes with their sizes")
    def health() -> dict[str, Any]:
        return {"status": "ok", "indexes": {name: len(s.index) for name, s in service.served.items()}}

    @app.get("/api/indexes", dependencies=guarded, summary="The served indexes")
    def indexes() -> list[dict[str, Any]]:
        return [s.describe() for s in service.served.values()]

    # The search endpoints are async: they await the batchers' futures instead of holding a thread
    # each, and return their JSON directly (FastAPI's generic encoder costs more than the search).

    @app.post("/api/search", dependencies=guarded, summary="Search by a text, an index row or a vector")
    async def search(body: SearchRequest) -> JSONResponse:
        start = time.perf_counter()
        served = service.get(body.index)
        vectors = await _vectors(service, served, [body])
        results = (await _search(service, served, vectors, k=body.k, threshold=body.threshold))[0]
        return JSONResponse(_answer(served, body.k, _query_echo(body), results, start))

    @app.post("/api/search/batch", dependencies=guarded, summary="Several queries against one index")
    async def search_batch(body: BatchRequest) -> JSONResponse:
        start = time.perf_counter()
        served = service.get(body.index)
        vectors = await _vectors(service, served, body.queries)
        found = await _search(service, served, vectors, k=body.k, threshold=body.threshold)
        answers = [_answer(served, body.k, _query_echo(q), r, start) for q, r in zip(body.queries, found)]
        return JSONResponse({"index": served.name, "ms": _ms(start), "answers": answers})

    @app.post("/api/search/image", dependencies=guarded, summary="Search by an uploaded image")
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

    @app.get("/api/thumbnail/{index}/{row}", dependencies=guarded, summary="A thumbnail of a row's image")
    def thumbnail(index: str, row: int, size: Annotated[int, Query(ge=16, le=512)] = 256) -> Response:
        data, media_type = service.thumbnail(service.get(index), row, size)
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/image/{index}/{row}", dependencies=guarded, summary="The image file of a row")
    def image(index: str, row: int) -> FileResponse:
        return FileResponse(service.image_file(service.get(index), row))

    # clip-retrieval's back end -------------------------------------------------------------------

    @app.get("/indices-list", dependencies=guarded, summary="clip-retrieval: the index names")
    def indices_list() -> list[str]:
        return list(service.served)

    @app.post(
        "/knn-service",
        dependencies=guarded,
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
        found = await _search(service, served, vectors, k=body.num_images, deduplicate=body.deduplicate)
        return JSONResponse([_clip_retrieval_hit(served, hit, request) for hit in found[0]])

    @app.post(
        "/metadata",
        dependencies=guarded,
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


def _token_check(token: str | None):
    async def check(request: Request) -> None:  # async: a plain def would cost every request a thread hop
        if token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "a bearer token is required (Authorization: Bearer TOKEN)")

    return check


def _validation_line(errors: list[dict]) -> str:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where or 'request'}: {first.get('msg', 'invalid')}{more}"


class _BodyLimit:
    """ASGI middleware refusing a request whose body is announced larger than an upload may be,
    before any of it is read (a body sent without a length is cut at the limit when read:
    :meth:`SearchService.encode_image`)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                detail = f"request body of {int(length)} bytes; uploads are limited to {MAX_UPLOAD_BYTES} bytes"
                await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _limit_request_size(app: FastAPI) -> None:
    app.add_middleware(_BodyLimit, limit=MAX_UPLOAD_BYTES + (1 << 20))  # the image plus the form's other fields


def _install_error_handlers(app: FastAPI) -> None:
    def reply(status: int, detail: str) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

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
