"""/api/v1/audit: the audit log, read from its file, for auditors and admins."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from gateway.api import schemas
from gateway.api.auth import require_roles
from gateway.approvals import Principal
from quarantine.accounts import Role

router = APIRouter(prefix="/audit", tags=["audit"])

Reader = Annotated[Principal, Depends(require_roles(Role.AUDITOR, Role.ADMIN))]


def _ts(entry: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(entry.get("ts", "")).replace("Z", "+00:00"))
    except ValueError:
        return None


def _matches(
    entry: dict[str, Any],
    id: str | None,
    actor: str | None,
    event: str | None,
    since: datetime | None,
    until: datetime | None,
) -> bool:
    if id is not None and entry.get("id") != id:
        return False
    if actor is not None and entry.get("actor") != actor:
        return False
    if event is not None and entry.get("event") != event:
        return False
    if since is None and until is None:
        return True
    ts = _ts(entry)
    return ts is not None and (since is None or ts >= since) and (until is None or ts < until)


def read_page(
    path: Path,
    *,
    after: int,
    limit: int,
    id: str | None = None,
    actor: str | None = None,
    event: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Entries after line `after` (1-based) that match, and the cursor for the next page.
    A linear scan: fine for the log of one rotation period; an index comes with size."""
    found: list[dict[str, Any]] = []
    if not path.exists():
        return found, None
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number <= after:
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict) and _matches(entry, id, actor, event, since, until):
                entry["line"] = number
                found.append(entry)
                if len(found) == limit:
                    return found, number
    return found, None


@router.get("", response_model=schemas.AuditPage, responses={401: {}, 403: {}, 404: {}})
async def audit_log(
    request: Request,
    _user: Reader,
    id: Annotated[str | None, Query(max_length=64)] = None,
    actor: Annotated[str | None, Query(max_length=128)] = None,
    event: Annotated[str | None, Query(max_length=64)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> schemas.AuditPage:
    """Audit entries, oldest first, filtered by message id, actor, event and time.
    Each entry carries its `line` number; `next_cursor` continues after it."""
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise HTTPException(422, f"{name} needs a time zone, e.g. 2026-11-24T09:00:00Z")
    path: str = request.app.state.audit_path
    if path == "-":
        raise HTTPException(404, "the audit log is written to standard output, not a file")
    items, next_cursor = await asyncio.to_thread(
        read_page,
        Path(path),
        after=cursor,
        limit=limit,
        id=id,
        actor=actor,
        event=event,
        since=since,
        until=until,
    )
    return schemas.AuditPage(items=items, next_cursor=next_cursor)
