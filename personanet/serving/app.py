"""The scoring service's HTTP app: routes, bearer token, limits and the access log.

`create_app` builds a Starlette app over a `ModelHolder` (the served `Scorer`,
swapped whole on reload). Every request needs the bearer token (compared in
constant time; 401), bodies and batches are bounded (413), records that break a
rule are refused naming row, column and rule, never a value (422). The access
log has one line per request: method, path, status, latency, rows; never a body,
a query string, a header or a client address.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from personanet.serving.scorer import RecordError, Scorer

access_log = logging.getLogger("personanet.serve.access")
log = logging.getLogger("personanet")


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_body: int = 1_000_000
    max_batch: int = 1000


class ModelHolder:
    """The scorer requests use; `reload` loads a newer one, then swaps the reference.

    A request reads `current` once and scores with that scorer to the end, so a swap
    never drops or mixes a request; the old scorer is freed when its last request ends.
    """

    def __init__(self, scorer: Scorer, load: Callable[[], Scorer | None]) -> None:
        self.current = scorer
        self._load = load
        self._reloading = threading.Lock()

    def reload(self, *, quiet: bool = False) -> bool:
        """Swap to the scorer `load` gives (None: nothing newer); True when it swapped.

        A failing load keeps the served model: a bad reload must not stop the service.
        `quiet` (the `--watch` poll): "nothing newer" is not worth a log line each time.
        """
        with self._reloading:
            try:
                scorer = self._load()
            except Exception as exc:  # noqa: BLE001 - keep serving whatever the new one did
                log.error("serve: reload failed, still serving %s: %s",
                          self.current.info.version, exc)
                return False
            if scorer is None or scorer.info.version == self.current.info.version:
                log.log(logging.DEBUG if quiet else logging.INFO,
                        "serve: no newer gated model; still serving %s",
                        self.current.info.version)
                return False
            old, self.current = self.current.info.version, scorer
            log.info("serve: reloaded: %s -> %s", old, scorer.info.version)
            return True


class HTTPProblem(Exception):
    """An error answer: status and a JSON body without any request value."""

    def __init__(self, status: int, error: str, **detail: Any) -> None:
        super().__init__(error)
        self.status = status
        self.body = {"error": error, **detail}


def create_app(holder: ModelHolder, token: str, *, limits: Limits = Limits(),
               reload_on_sighup: bool = False, watch_seconds: float | None = None
               ) -> Starlette:
    """The service: `POST /v1/predict`, `GET /v1/model`, `GET /healthz`.

    `reload_on_sighup` (the main thread's event loop only) reloads in a worker
    thread on SIGHUP, so the loop keeps answering while the new model loads.
    `watch_seconds`: also look for a newer gated model every so many seconds (the same
    reload, in a worker thread; silent while there is none).
    """
    expected = f"Bearer {token}".encode()

    def guarded(handler: Callable[[Request], Awaitable[tuple[dict[str, Any], int]]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            rows = 0
            try:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    raise HTTPProblem(401, "a bearer token is required")
                payload, rows = await handler(request)
                response: Response = JSONResponse(payload)
            except HTTPProblem as exc:
                response = JSONResponse(exc.body, status_code=exc.status)
            except Exception as exc:  # noqa: BLE001 - a message may hold a value: type only
                log.error("serve: internal error (%s)", type(exc).__name__)
                response = JSONResponse({"error": "internal error"}, status_code=500)
            if response.status_code == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            access_log.info("%s %s %d %.1fms rows=%d", request.method, request.url.path,
                            response.status_code, (time.perf_counter() - started) * 1000, rows)
            return response
        return endpoint

    async def predict(request: Request) -> tuple[dict[str, Any], int]:
        records = _records(json_body(await read_body(request, limits.max_body)))
        if len(records) > limits.max_batch:
            raise HTTPProblem(413, f"at most {limits.max_batch} records per request",
                              records=len(records))
        scorer = holder.current
        try:
            scored = await run_in_threadpool(scorer.score, records)
        except RecordError as exc:
            raise HTTPProblem(422, "records break the input rules",
                              problems=exc.problems) from None
        return {"model_version": scorer.info.version, "predictions": scored}, len(scored)

    async def model(request: Request) -> tuple[dict[str, Any], int]:
        return holder.current.info.to_json(), 0

    async def healthz(request: Request) -> tuple[dict[str, Any], int]:
        return {"status": "ok", "model_version": holder.current.info.version}, 0

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        if reload_on_sighup:
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: threading.Thread(target=holder.reload, daemon=True).start())
        watcher = (asyncio.create_task(_watch(holder, watch_seconds))
                   if watch_seconds else None)
        yield
        if watcher is not None:
            watcher.cancel()

    return Starlette(routes=[
        Route("/v1/predict", guarded(predict), methods=["POST"]),
        Route("/v1/model", guarded(model), methods=["GET"]),
        Route("/healthz", guarded(healthz), methods=["GET"]),
    ], lifespan=lifespan)


async def _watch(holder: ModelHolder, seconds: float) -> None:
    """Poll for a newer gated model until cancelled (the server's shutdown)."""
    while True:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(holder.reload, quiet=True)


async def read_body(request: Request, max_body: int) -> bytes:
    """The body, refused (413) once it passes `max_body` bytes, declared or streamed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise HTTPProblem(413, f"a request body is at most {max_body} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise HTTPProblem(413, f"a request body is at most {max_body} bytes")
    return bytes(body)


def json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HTTPProblem(422, "the body is not JSON") from None


def _records(payload: Any) -> list[Any]:
    """One record object, or {"records": [...]}."""
    if isinstance(payload, dict) and "records" in payload:
        if not isinstance(payload["records"], list):
            raise HTTPProblem(422, "records is a JSON array of record objects")
        return payload["records"]
    if isinstance(payload, dict):
        return [payload]
    raise HTTPProblem(422, 'the body is one record object or {"records": [...]}')
