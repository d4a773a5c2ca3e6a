"""The HTTP routes over a :class:`~locore.serve.service.SearchService` (FastAPI).

    POST /search             multipart ``image`` + optional ``box``, ``top_k``, ``chain`` -> JSON
    GET  /image/{id}         an image of the index, by id (never by a path from the request)
    GET  /image/{id}/thumb   the same, as a JPEG thumbnail
    GET  /healthz            liveness (no token needed)
    GET  /stats              index, models, device, request counts, latency percentiles
    GET  /                   the search page (static files shipped in the package)
    GET  /docs               OpenAPI documentation, served offline

Every refused request answers ``{"error": message}`` with a 4xx status and costs its client part
of its allowance of refusals (``refusals``: beyond it, 429 with ``Retry-After``); a token, when
set, is checked on every route but ``/healthz`` (``Authorization: Bearer`` header, or the cookie
that ``/?token=...`` sets for the browser page).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import io
import time
from pathlib import Path
from typing import Annotated

from fastapi import File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from locore.serve.refusals import RefusalBudget, retry_after
from locore.serve.service import Job, SearchService
from locore.serve.uploads import RequestError, decode_upload, parse_box

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "locore_token"
OPEN_ROUTES = ("/healthz",)
RETRY_AFTER_S = 1  # what a 503 (queue full) tells the client to wait
MULTIPART_SLACK = 64 * 1024  # bytes a multipart body may exceed the image limit by


def create_app(service: SearchService) -> FastAPIOffline:
    """The FastAPI application; the caller starts and closes ``service``."""
    config = service.config
    refusals = RefusalBudget(config.refusals_burst, config.refusals_per_s)
    app = FastAPIOffline(
        title="locore",
        summary="Image retrieval: global search + LoCoRe list-wise re-ranking.",
        version="0.1.0",
    )

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 503 else None
        return error(err.status, str(err), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}"
            for e in err.errors()
        )
        return error(422, problems)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        client = (request.client.host, request.client.port) if request.client else None
        wait = 0.0 if path in OPEN_ROUTES else refusals.wait(client)
        if wait > 0:  # held back before anything is read: ignoring Retry-After gains nothing
            await asyncio.sleep(wait)
            response: Response = error(
                429,
                "this client sent too many refused requests; wait between requests",
                {"Retry-After": retry_after(wait)},
            )
        elif config.token and path not in OPEN_ROUTES and not authorized(request):
            response = error(401, "missing or wrong token; send 'Authorization: Bearer <token>'")
            response.headers["WWW-Authenticate"] = "Bearer"
        elif path == "/search" and too_large(request):
            response = error(
                413, f"the upload is over the limit of {config.max_upload_bytes} bytes"
            )
        else:
            response = await call_next(request)
        refusals.charge(client, response.status_code)
        # refused before routing (401, 413, 429): counted under the path when it is a route's
        name = getattr(request.scope.get("route"), "path", path if path in fixed else "other")
        service.stats.request(name, response.status_code, time.perf_counter() - start)
        return response

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        sent = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE)
        if sent is None and request.url.path == "/":
            sent = request.query_params.get("token")
        return sent is not None and hmac.compare_digest(sent.encode(), config.token.encode())

    def too_large(request: Request) -> bool:
        length = request.headers.get("content-length")
        return (
            length is not None
            and length.isdigit()
            and int(length) > config.max_upload_bytes + MULTIPART_SLACK
        )

    @app.post("/search", summary="Search the index with a photo")
    async def search(
        image: Annotated[UploadFile, File(description="the query photo (JPEG, PNG, WebP, ...)")],
        box: Annotated[
            str | None, Form(description="region of interest x1,y1,x2,y2 in image pixels")
        ] = None,
        top_k: Annotated[int, Form(ge=1, le=1000, description="results returned")] = 20,
        chain: Annotated[
            str | None, Form(description="re-ranking chain: 'default' (configured) or 'none'")
        ] = None,
    ) -> dict:
        """Ranked ids and names with final score, global score and rank before re-ranking (the
        records of ``locore search --out``, ranks from 1), the first-stage ranking (``before``)
        and per-stage times in milliseconds."""
        start = time.perf_counter()
        chain = chain or service.default_chain
        service.check_chain(chain)  # cheap checks before the costly decode
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def reply(value: dict | Exception) -> None:
            loop.call_soon_threadsafe(settle, future, value)

        with service.arriving():
            data = await image.read(config.max_upload_bytes + 1)
            network_input, region = await run_in_threadpool(prepare, data, box)
            decoded = time.perf_counter()
            service.submit(Job(network_input, region, chain, top_k, reply))
        value = await future
        if isinstance(value, Exception):
            raise value
        value["timings_ms"]["decode"] = round((decoded - start) * 1000.0, 2)
        value["timings_ms"]["total"] = round((time.perf_counter() - start) * 1000.0, 2)
        return value

    def prepare(data: bytes, box: str | None) -> tuple:
        """Upload bytes and box text -> (network input, box), in a worker thread."""
        pixels = decode_upload(data, config.max_upload_bytes, config.max_pixels)
        region = parse_box(box, pixels.shape[1], pixels.shape[0])
        return service.prepare(pixels, region), region

    def image_path(image_id: int) -> Path:
        generation = service.current
        names = generation.handle.names
        if not 0 <= image_id < len(names):
            raise RequestError(
                404, f"image id {image_id} is not in the index (0..{len(names) - 1})"
            )
        root = generation.images_root
        if root is None:
            raise RequestError(404, "the index does not record its image folder; pass --images")
        path = (root / names[image_id]).resolve()
        if not path.is_relative_to(root.resolve()) or not path.is_file():
            raise RequestError(404, f"image id {image_id} is no longer on disk")
        return path

    @app.get("/image/{image_id}", summary="An image of the index")
    async def image_file(image_id: int) -> FileResponse:
        return FileResponse(image_path(image_id))

    @app.get("/image/{image_id}/thumb", summary="A JPEG thumbnail of an image of the index")
    async def image_thumb(image_id: int) -> Response:
        path = image_path(image_id)
        data = await run_in_threadpool(thumbnail, path, path.stat().st_mtime_ns, config.thumb_size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=60"})

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict:
        return {"status": "ok", "index_size": len(service.current.handle.names)}

    @app.get("/stats", summary="Index, models, device, request counts, latency percentiles")
    async def stats() -> dict:
        return {**service.describe(), **service.stats.snapshot()}

    @app.get("/", include_in_schema=False)
    async def page(request: Request) -> Response:
        token = request.query_params.get("token")
        # The guard has checked it: keep the token in a cookie and drop it from the URL.
        if config.token and token:
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    fixed = {route.path for route in app.routes if "{" not in route.path}  # read by guard
    return app


def settle(future: asyncio.Future, value: dict | Exception) -> None:
    """Resolve ``future`` unless the client went away (the future was cancelled)."""
    if not future.done():
        future.set_result(value)


@functools.lru_cache(maxsize=1024)
def thumbnail(path: Path, mtime_ns: int, size: int) -> bytes:
    """JPEG bytes of ``path`` shrunk to ``size`` on its long side (cached per file version)."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))
        img = img.convert("RGB")
        img.thumbnail((size, size))
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85)
    return out.getvalue()
