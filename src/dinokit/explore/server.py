"""The HTTP side of `dinokit explore`: a Starlette application over an `Explorer`.

Every `/api/...` answer is JSON (`{"error": "..."}` with a 4xx status when a request cannot be served, and
the server goes on) except `/api/data/image`, a PNG. Uploads are the request body itself
(`Content-Type: application/octet-stream`, a type a cross-site form cannot send), read up to a size limit and
decoded by the project's decoder. Only the host names of this machine are answered (no DNS rebinding)
unless the server was bound to every address."""
import io
import traceback
from importlib.resources import files

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..data.decode import BadImage, decode_bytes
from .library import Refused
from .session import Explorer, Gone

STATIC = files("dinokit.explore") / "static"
DEFAULT_MAX_UPLOAD = 20 << 20
DRAIN_FACTOR = 4  # bodies up to this many times the limit are read before being refused
LOCAL_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
SECURITY_HEADERS = [
    (b"content-security-policy", (b"default-src 'self'; img-src 'self' data:; script-src 'self'; "
                                  b"style-src 'self'; connect-src 'self'; frame-ancestors 'none'")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class TooLarge(Exception):
    pass


class WrongType(Exception):
    pass


ERROR_STATUS = [(BadImage, 400), (Refused, 403), (FileNotFoundError, 404), (Gone, 410), (TooLarge, 413),
                (WrongType, 415), (ValueError, 400)]


def error_response(e: Exception) -> JSONResponse:
    for kind, status in ERROR_STATUS:
        if isinstance(e, kind):
            message = f"not a usable image: {e}" if isinstance(e, BadImage) else str(e)
            return JSONResponse({"error": message}, status_code=status)
    raise e


def api(handler):
    """A route whose errors become one JSON line with their status (500 for a fault of ours, logged with
    its traceback); the server keeps running either way."""
    async def route(request: Request):
        try:
            return await handler(request)
        except tuple(kind for kind, _ in ERROR_STATUS) as e:
            return error_response(e)
        except Exception as e:
            traceback.print_exc()
            return JSONResponse({"error": f"internal error ({type(e).__name__}: {e})"}, status_code=500)
    return route


class SecurityHeaders:
    """Adds the headers above to every response: no inline or foreign script, no framing, no sniffing."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)
        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused when it passes `limit` bytes (whatever Content-Length says). A body a few
    times over the limit is read to its end before the refusal, so that a browser still uploading gets the
    error rather than a reset connection; a larger one is cut short."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/octet-stream":
        raise WrongType("send the image as the request body with Content-Type: application/octet-stream")
    declared = request.headers.get("content-length", "")
    size_text = f"of {int(declared) / 2**20:.1f} MiB " if declared.isdigit() else ""
    too_large = TooLarge(f"upload {size_text}is over the {limit / 2**20:g} MiB limit")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise too_large
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_FACTOR * limit:
            raise too_large
        if size <= limit:
            body += chunk
    if size > limit:
        raise too_large
    if not body:
        raise BadImage("empty file")
    return bytes(body)


def png_bytes(img, max_side: int) -> bytes:
    im = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def query_int(request: Request, name: str, default: int | None = None) -> int:
    value = request.query_params.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"missing parameter {name}")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"parameter {name} must be an integer, not {value!r}") from None


def create_app(explorer: Explorer, max_upload: int = DEFAULT_MAX_UPLOAD,
               allowed_hosts: list[str] | None = None) -> Starlette:
    """The application. `allowed_hosts`: the Host names answered (default: this machine's loopback names).

    >>> uvicorn.run(create_app(Explorer(["checkpoint.pt"])), host="127.0.0.1", port=8000)
    """

    async def page(request: Request):
        return FileResponse(str(STATIC / "index.html"), headers={"cache-control": "no-cache"})

    async def info(request: Request):
        return JSONResponse(explorer.info() | {"max_upload": max_upload})

    def data_images():
        if explorer.data is None:
            raise FileNotFoundError("no --data given")
        return explorer.data

    async def data_list(request: Request):
        images = data_images()
        offset, limit = query_int(request, "offset", 0), query_int(request, "limit", 48)
        if offset < 0 or not 1 <= limit <= 500:
            raise ValueError("offset must be >= 0 and limit 1..500")
        refs = images.refs[offset:offset + limit]
        return JSONResponse({"total": len(images), "offset": offset,
                             "items": [{"ref": r, "class": images.class_of(r)} for r in refs]})

    async def data_image(request: Request):
        images = data_images()
        max_side = query_int(request, "max", 0)
        img = await run_in_threadpool(images.read, request.query_params.get("ref", ""))
        data = await run_in_threadpool(png_bytes, img, max(0, min(max_side, 2048)))
        return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    async def upload(request: Request):
        body = await read_body(request, max_upload)
        img = await run_in_threadpool(decode_bytes, body)
        name = request.query_params.get("name") or "upload"
        return JSONResponse(await run_in_threadpool(explorer.analyse, img, name))

    async def open_data(request: Request):
        ref = request.query_params.get("ref", "")
        img = await run_in_threadpool(data_images().read, ref)
        return JSONResponse(await run_in_threadpool(explorer.analyse, img, ref) | {"ref": ref})

    async def view(request: Request):
        try:
            threshold = float(request.query_params.get("threshold", "0.6"))
        except ValueError:
            raise ValueError("threshold must be a number") from None
        result = await run_in_threadpool(explorer.view, request.query_params.get("id", ""),
                                         query_int(request, "model", 0), query_int(request, "layer", -1), threshold)
        return JSONResponse(result)

    async def neighbours(request: Request):
        return JSONResponse(await run_in_threadpool(explorer.neighbours, request.query_params.get("id", ""),
                                                    query_int(request, "k", 10)))

    async def index_map(request: Request):
        return JSONResponse(await run_in_threadpool(explorer.map))

    async def metrics(request: Request):
        return JSONResponse(await run_in_threadpool(explorer.metrics, max(0, query_int(request, "after", 0))))

    routes = [
        Route("/", page),
        Route("/api/info", api(info)),
        Route("/api/data", api(data_list)),
        Route("/api/data/image", api(data_image)),
        Route("/api/upload", api(upload), methods=["POST"]),
        Route("/api/open", api(open_data), methods=["POST"]),
        Route("/api/view", api(view)),
        Route("/api/neighbours", api(neighbours)),
        Route("/api/map", api(index_map)),
        Route("/api/metrics", api(metrics)),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders),
                  Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOCAL_HOSTS)]
    return Starlette(routes=routes, middleware=middleware)
