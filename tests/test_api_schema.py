"""The served OpenAPI document, and a bounded schemathesis run against it: whatever
the generated requests, the API answers JSON and never a 5xx."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.api_support import HOLD_FOR_COMPLIANCE, message, person, send
from tests.conftest import gateway_config, running

schemathesis = pytest.importorskip("schemathesis")

EXAMPLES_PER_OPERATION = 15


def _fuzz(base: str, token: str) -> list[str]:
    """Run in a thread: schemathesis calls are blocking, the gateway serves in the loop."""
    schema = schemathesis.openapi.from_url(f"{base}/api/v1/openapi.json")
    problems: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: object) -> None:
            response = case.call(  # type: ignore[attr-defined]
                base_url=base, headers={"Authorization": f"Bearer {token}"}
            )
            label = f"{case.method} {case.formatted_path}"  # type: ignore[attr-defined]
            if response.status_code >= 500:
                problems.append(f"{label}: {response.status_code} {response.text[:200]}")
            elif "json" in str(response.headers.get("content-type", "")):
                body = response.json()
                if response.status_code >= 400 and "detail" not in body:
                    problems.append(f"{label}: {response.status_code} without detail")

        check()
    return problems


async def test_openapi_is_served_and_schemathesis_finds_no_5xx(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = gateway_config(
        tmp_path,
        sqlite_url,
        None,
        rules=[HOLD_FOR_COMPLIANCE],  # type: ignore[arg-type]
    )
    async with running(config) as gw:
        token = await person(gw, "erin", "admin")
        await send(gw, message())
        base = f"http://127.0.0.1:{gw.http_port}"
        async with httpx.AsyncClient() as http:
            document = (await http.get(f"{base}/api/v1/openapi.json")).json()
        problems = await asyncio.wait_for(asyncio.to_thread(_fuzz, base, token), 60)
    paths = set(document["paths"])
    assert {
        "/api/v1/messages",
        "/api/v1/messages/{id}",
        "/api/v1/messages/{id}/raw",
        "/api/v1/messages/{id}/approve",
        "/api/v1/messages/{id}/reject",
        "/api/v1/messages/{id}/cancel",
        "/api/v1/messages/{id}/release-now",
        "/api/v1/audit",
    } <= paths
    assert "HTTPBearer" in document["components"]["securitySchemes"]
    assert problems == []
