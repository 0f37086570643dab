"""The admin HTTP app: health, readiness and metrics here; the /api/v1 routes plug in."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from sqlalchemy import text

from quarantine import repository as repo
from quarantine.db import Store


def create_app(store: Store, *, version: str = "0.1.0") -> FastAPI:
    app = FastAPI(
        title="Sekisho",
        version=version,
        description="Outbound mail gateway: quarantine, approval and audit API",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    registry = CollectorRegistry()
    depth = Gauge(
        "sekisho_messages", "Messages in the store by state", ["state"], registry=registry
    )

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
    async def metrics() -> Response:
        """Prometheus text format."""
        async with store.read() as session:
            counts: dict[str, Any] = await repo.queue_depth(session)
        for state, count in counts.items():
            depth.labels(state=state).set(count)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
