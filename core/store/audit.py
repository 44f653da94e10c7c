"""The audit log: every admin change, written in the change's own transaction."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select, tuple_
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
    """Newest first. entity_name: the whole history of each entity that had this name at some
    point, by its id (entries keep the name of their time, so a rename would cut the history
    in two: `--name new` began at the rename, `--name old` ended there)."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if entity_type is not None:
        query = query.where(AuditEntry.entity_type == entity_type)
    if entity_name is not None:
        named = select(AuditEntry.entity_type, AuditEntry.entity_id).where(
            AuditEntry.entity_name == entity_name
        )
        query = query.where(tuple_(AuditEntry.entity_type, AuditEntry.entity_id).in_(named))
    return list(session.scalars(query))
