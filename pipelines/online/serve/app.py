"""The FastAPI app of `temper serve`: routes, the gate every request passes, start and stop.

Routes: GET /v1/models (and /v1/models/{id}), POST /v1/chat/completions, GET /healthz (the
process is up), GET /readyz (the models are loaded: 503 before), GET /metrics (Prometheus).
`Gate`, a plain ASGI middleware (Starlette's BaseHTTPMiddleware buffers streaming responses
and hides client disconnects), gives each request an id (`x-request-id`, the client's if it
sent a sane one), checks the API key on /v1/*, refuses bodies over `max_body_bytes` (413, also
for chunked uploads), counts statuses and writes one JSON log line per request. Every error,
FastAPI's own included, leaves in OpenAI's shape; nothing a request does stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import auth
from .adapters import ModelTable
from .completions import Completions
from .config import ServeConfig
from .metrics import ServeMetrics
from .protocol import ApiError, ChatRequest, validation_error
from .routing import RoutedCompletions, as_events, routable

log = logging.getLogger("temper.serve")
RID = re.compile(r"^[\w.:-]{1,128}$")
OPEN = ("/healthz", "/readyz", "/metrics")


def error_response(err: ApiError, request_id: str | None = None) -> JSONResponse:
    headers = dict(err.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class Gate:
    """ASGI middleware: request id, API key, body size, status counts, the request log line."""

    def __init__(
        self,
        app: Any,
        cfg: ServeConfig,
        keys: list[str],
        metrics: ServeMetrics,
        monitor: Any = None,
    ):
        self.app, self.cfg, self.keys, self.metrics = app, cfg, keys, metrics
        self.monitor = monitor  # a monitor.RequestLog, or None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if RID.match(given) else uuid.uuid4().hex
        info: dict[str, Any] = {}
        scope.setdefault("state", {})["temper"] = info
        path = scope["path"]
        status = {"code": 500}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            refusal = self._refuse(path, headers)
            if refusal is None:
                receive, refusal = await self._buffer(receive, headers)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - t0
            route = path if path in (*OPEN, "/v1/models", "/v1/chat/completions") else "other"
            self.metrics.requests.labels(route, str(status["code"])).inc()
            if path not in OPEN:
                log.info(
                    "request",
                    extra={
                        "request_id": rid,
                        "method": scope["method"],
                        "path": path,
                        "status": status["code"],
                        "duration_ms": round(seconds * 1000, 1),
                        # `_` keys (the text, the job) are for the monitor, never the log
                        **{k: v for k, v in info.items() if not k.startswith("_")},
                    },
                )
            if (
                self.monitor is not None
                and path == "/v1/chat/completions"
                and status["code"] not in (401, 413)
            ):
                self.monitor.submit(rid, info, status["code"], seconds)

    def _refuse(self, path: str, headers: dict[str, str]) -> ApiError | None:
        if path.startswith("/v1/") and not auth.allowed(headers.get("authorization"), self.keys):
            return ApiError(
                401,
                "Incorrect API key provided"
                if headers.get("authorization")
                else "Missing API key: send it as `Authorization: Bearer <key>`",
                type_="invalid_request_error",
                code="invalid_api_key",
            )
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > self.cfg.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"The request body exceeds {self.cfg.max_body_bytes} bytes",
            code="request_too_large",
        )

    async def _buffer(self, receive: Any, headers: dict[str, str]):
        """Read the body (up to the limit) before the app sees it; later receives (the
        disconnect a streaming response listens for) go to the client's channel."""
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, None  # the client left before sending its body
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.cfg.max_body_bytes:
                return receive, self._too_large()
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        first = {"sent": False}

        async def replay() -> dict:
            if not first["sent"]:
                first["sent"] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None


class Server:
    """What the routes share: config, the model table, the engine, metrics, readiness."""

    def __init__(
        self,
        cfg: ServeConfig,
        table: ModelTable,
        metrics: ServeMetrics,
        router: Any = None,
        cache: Any = None,
    ):
        self.cfg, self.table, self.metrics = cfg, table, metrics
        self.engine = table.loader.engine
        self.completions = Completions(cfg, self.engine, metrics)
        self.router = router  # a route.Router, or None: the served version answers alone
        self.routed = (
            RoutedCompletions(self.completions, router, router.cfg, cache)
            if router is not None
            else None
        )
        self.ready = threading.Event()
        self.load_error: str | None = None

    def load(self) -> None:
        """Load every model; on failure (no such alias yet, registry down) retry every
        watch interval, answering 503 with the reason meanwhile."""
        while True:
            try:
                self.table.load_all()
                break
            except Exception as err:  # noqa: BLE001 - reported by /readyz and every request
                error = f"{type(err).__name__}: {err}"
                if error != self.load_error:
                    log.error("could not load the models (retrying): %s", error)
                self.load_error = error
            if self.table.stop.wait(self.cfg.watch_interval_s):
                return  # shutting down before anything loaded
        self.load_error = None
        self.ready.set()
        log.info("ready", extra={"models": [s.label for s in self.table.current.values()]})
        self.table.watch()

    def require_ready(self) -> None:
        if not self.ready.is_set():
            message = (
                f"The models could not be loaded yet (retrying): {self.load_error}"
                if self.load_error
                else "The models are still loading"
            )
            raise ApiError(503, message, type_="service_unavailable", headers={"retry-after": "5"})


def create_app(
    cfg: ServeConfig,
    table: ModelTable,
    keys: list[str],
    metrics: ServeMetrics,
    router: Any = None,
    cache: Any = None,
    monitor: Any = None,
):
    """The served app: FastAPI's routes (in this order) behind the `Gate`."""
    server = Server(cfg, table, metrics, router, cache)
    lifespan = _lifespan(server, router, cache, monitor)
    app = FastAPI(title="temper serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    _add_error_handlers(app)
    _add_health_routes(app, server, monitor)
    _add_model_routes(app, server)
    _add_chat_route(app, server)
    return Gate(app, cfg, keys, metrics, monitor)


def _lifespan(
    server: Server, router: Any, cache: Any, monitor: Any
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Start the engine, the monitor and the loading thread; on shutdown stop the watcher,
    drain the engine, then close the router, the cache and the monitor."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        if monitor is not None:
            monitor.start()
        loader = threading.Thread(target=server.load, name="temper-load", daemon=True)
        loader.start()
        yield
        server.table.close()
        await asyncio.to_thread(server.engine.stop, server.cfg.drain_timeout_s)
        if router is not None:
            await router.aclose()
        if cache is not None:
            cache.close()
        if monitor is not None:
            await asyncio.to_thread(monitor.close)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's and Starlette's own included, leaves in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError):
        return error_response(validation_error(list(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(err.status_code, str(err.detail), type_=kind))

    @app.exception_handler(Exception)
    async def crash(request: Request, err: Exception):
        log.exception("unhandled error")
        return error_response(ApiError(500, "Internal server error", type_="server_error"))


def _add_health_routes(app: FastAPI, server: Server, monitor: Any) -> None:
    """GET /healthz (the process is up), /readyz (models loaded, engine up), /metrics."""

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        server.require_ready()
        if not server.engine.healthy():
            raise ApiError(
                503,
                "The model engine is unavailable (restarting)",
                type_="service_unavailable",
                headers={"retry-after": "5"},
            )
        models = [s.label for s in server.table.current.values()]
        return {"status": "ready", "models": models, "engine": server.engine.status()}

    @app.get("/metrics")
    async def metrics_route():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics = server.metrics
        metrics.queue.set(server.engine.depth())
        if monitor is not None:
            metrics.log_queue.set(monitor.depth())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_model_routes(app: FastAPI, server: Server) -> None:
    """GET /v1/models and /v1/models/{id}: OpenAI's model objects, plus the registry's."""

    @app.get("/v1/models")
    async def list_models():
        server.require_ready()
        cards = [_model_card(k, v) for k, v in server.table.current.items()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        server.require_ready()
        served = server.table.get(model_id)
        if served is None:
            raise _not_found(server.table, model_id)
        return _model_card(model_id, served)


def _model_card(model_id: str, served: Any) -> dict[str, Any]:
    """One model object: OpenAI's fields, then the registered model, version and task."""
    from ...models import describe

    return {
        "id": model_id,
        "object": "model",
        "created": int(served.path.stat().st_mtime),
        "owned_by": "temper",
        "root": served.source.name or model_id,
        "parent": describe(served.base),
        "registered_model": served.source.name,
        "version": served.version,
        "task": served.task.name,
    }


def _not_found(table: ModelTable, model_id: str) -> ApiError:
    """OpenAI's 404 for an unknown model, naming the ones that are served."""
    known = ", ".join(table.current) or "none"
    return ApiError(
        404,
        f"The model `{model_id}` does not exist (served: {known})",
        type_="not_found_error",
        param="model",
        code="model_not_found",
    )


def _add_chat_route(app: FastAPI, server: Server) -> None:
    """POST /v1/chat/completions: routed when the server routes and the request can be."""

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        info = request.scope["state"]["temper"]
        server.require_ready()
        req = await _chat_request(request)
        served = server.table.get(req.model)
        if served is None:
            raise _not_found(server.table, req.model)
        users = [m for m in req.messages if m.role == "user"]
        if users:
            info["_text"] = users[-1].text()  # for the monitor's log (gate); never logged
        if server.routed is not None and routable(server.cfg.prompt, req):
            return await _routed_response(server.routed, req, served, info)
        _refuse_forced_tier(server, req)
        if req.stream:
            events = await server.completions.stream(req, served, info)
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        return JSONResponse(await server.completions.complete(req, served, info))


async def _chat_request(request: Request) -> ChatRequest:
    """The body as a ChatRequest; not JSON, not an object or not valid: OpenAI's 400."""
    try:
        payload = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "The request body must be a JSON object")
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as err:
        raise validation_error(list(err.errors())) from None


async def _routed_response(
    routed: RoutedCompletions, req: ChatRequest, served: Any, info: dict[str, Any]
) -> Response:
    """A routed answer: decided first, so a streamed one is sent as SSE chunks of it."""
    body, headers = await routed.answer(req, served, info)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            as_events(body, usage),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )
    return JSONResponse(body, headers=headers)


def _refuse_forced_tier(server: Server, req: ChatRequest) -> None:
    """A request that forces an API tier this server will not route to is refused (400),
    never silently answered by the served version."""
    if req.route is not None and req.route.tier not in (None, "self"):
        raise ApiError(
            400,
            f"route.tier {req.route.tier!r}: this server does not route "
            + (
                "(route.enabled is false)"
                if server.routed is None
                else "this request (only task answers without a custom response_format are routed)"
            ),
            param="route.tier",
        )
