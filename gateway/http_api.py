"""The admin HTTP app: health, readiness and metrics here; the /api/v1 routes plug in."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from gateway.api import audit as audit_routes
from gateway.api import messages as message_routes
from gateway.api.auth import Authenticator
from gateway.approvals import ApprovalError, Approvals, OnDecision
from gateway.audit import AuditLog
from gateway.body_limit import BodyLimit
from gateway.config import Config
from gateway.metrics import Metrics
from quarantine.db import Store

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def create_app(
    store: Store,
    *,
    config: Config | None = None,
    audit: AuditLog | None = None,
    clock: Callable[[], datetime] = _utcnow,
    wake: Callable[[], None] | None = None,
    on_decision: OnDecision | None = None,
    metrics: Metrics | None = None,
    version: str = "0.1.0",
) -> FastAPI:
    """`wake` tells delivery a message was released; `on_decision` is the hook for
    notices by mail (approved, rejected, cancelled, expired)."""
    config = config or Config()
    app = FastAPI(
        title="Sekisho",
        version=version,
        description="Outbound mail gateway: quarantine, approval and audit API",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    metrics = metrics or Metrics(store, clock)
    app.add_middleware(BodyLimit)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> Response:
        """Readiness: the store answers."""
        try:
            async with store.read() as session:
                await session.execute(text("SELECT 1"))
        except Exception as error:
            return JSONResponse(
                {"status": "unavailable", "store": type(error).__name__}, status_code=503
            )
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", tags=["operations"])
    async def prometheus() -> Response:
        """Prometheus text format: queue depth, deliveries by reply class, verdicts by
        rule, SMTP sessions and refusals, held waits, store latency."""
        return Response(await metrics.render(), media_type=metrics.content_type)

    _add_api(app, store, config, audit, clock, wake, on_decision)
    settle_heap()
    return app


def settle_heap() -> None:
    """Move what start-up built (modules, config, rules: ~150,000 objects) out of the
    collector's reach. Otherwise every full collection walks it all: ~100 ms on two
    cores, once every ~140 requests of a listing page, which was the listing's p99.
    The HTTP app is the last thing the gateway loads. Garbage is collected first, so
    that nothing already dead is kept for good."""
    gc.collect()
    gc.freeze()


def _add_api(
    app: FastAPI,
    store: Store,
    config: Config,
    audit: AuditLog | None,
    clock: Callable[[], datetime],
    wake: Callable[[], None] | None,
    on_decision: OnDecision | None,
) -> None:
    app.state.authenticator = Authenticator(store, clock)
    app.state.approvals = Approvals(
        store, audit, config.approval, clock, wake=wake, on_decision=on_decision
    )
    app.state.audit_path = audit.path if audit is not None else config.audit.path
    app.include_router(message_routes.router, prefix="/api/v1")
    app.include_router(audit_routes.router, prefix="/api/v1")

    @app.exception_handler(ApprovalError)
    async def refused(_request: Request, error: ApprovalError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=message_routes.error_status(error))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        # Never a stack trace or an HTML page: the detail names no internals.
        log.exception("HTTP %s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)
