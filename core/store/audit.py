"""The audit log: every admin change, written in the change's own transaction."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.store.db import notify_change
from core.store.tables import AuditEntry

ENTITY_TYPES = ("segment", "rule", "experiment", "model", "client")


def record(
    session: Session,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: object,
    entity_name: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> None:
    """Write the audit row and announce the change to listening servers (PostgreSQL)."""
    session.add(
        AuditEntry(
            actor=actor,
            action=action,
            entity_type=entity_type,
            entity_id=str(entity_id),
            entity_name=entity_name,
            before=before,
            after=after,
        )
    )
    notify_change(
        session, json.dumps({"entity": entity_type, "id": str(entity_id), "action": action})
    )


def entries(
    session: Session,
    entity_type: str | None = None,
    entity_name: str | None = None,
    limit: int = 50,
) -> list[AuditEntry]:
    """Newest first."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if entity_type is not None:
        query = query.where(AuditEntry.entity_type == entity_type)
    if entity_name is not None:
        query = query.where(AuditEntry.entity_name == entity_name)
    return list(session.scalars(query))
