"""Segments: named groups of users, by a feature condition or by an imported member list."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from sqlalchemy import Select, delete, func, insert, select
from sqlalchemy.orm import Session

from core.segments import ConditionError, parse_condition, to_json
from core.store import audit, validate
from core.store.errors import Conflict, InvalidInput, NotFound
from core.store.tables import Experiment, Rule, Segment, SegmentMember, utcnow

INSERT_CHUNK = 10_000
Query = TypeVar("Query", bound=Select[Any])


def locked(query: Query, for_update: bool, for_reference: bool) -> Query:
    """query's row read afresh and locked to the end of the transaction (PostgreSQL; SQLite's
    one writer needs none). for_update: a change or delete of the record, so another at the
    same moment waits for it instead of racing it. for_reference: a record that a new rule or
    experiment is about to name; FOR KEY SHARE, what its foreign key takes, so only a delete
    waits for it, or it for a delete, which it then finds done (NotFound)."""
    if not (for_update or for_reference):
        return query
    # Only the record's own table: a relationship loaded by an outer join cannot be locked.
    entity = query.column_descriptions[0]["entity"]
    held = query.with_for_update(read=for_reference, key_share=for_reference, of=entity)
    return held.execution_options(populate_existing=True)


def check_version(kind: str, label: str, actual: int, expected: int | None) -> None:
    """Optimistic locking for a read-then-write that spans two commands (`show`, then `update`)."""
    if expected is not None and expected != actual:
        raise Conflict(
            f"{kind} {label!r} is at version {actual}, not {expected}: someone changed it since "
            "you read it; show it again and retry"
        )


class Segments:
    """Repository: takes a Session and never commits; the caller owns the transaction."""

    def __init__(self, session: Session, actor: str = "system") -> None:
        self.session = session
        self.actor = actor

    def get(self, name: str, for_update: bool = False, for_reference: bool = False) -> Segment:
        """for_update, for_reference: see locked."""
        query = select(Segment).where(Segment.name == name)
        segment = self.session.scalar(locked(query, for_update, for_reference))
        if segment is None:
            raise NotFound(f"no segment named {name!r}; see `discountctl segments list`")
        return segment

    def list_all(self) -> list[Segment]:
        """In the order they are tried (docs/OFFERS.md): ascending priority, equal ones by name
        in code-point order. Sorted here: ORDER BY name would follow the database's collation,
        so SQLite and an en-US-collated PostgreSQL would pick different winners."""
        return sorted(self.session.scalars(select(Segment)), key=lambda s: (s.priority, s.name))

    def member_count(self, segment: Segment) -> int:
        query = select(func.count()).where(SegmentMember.segment_id == segment.id)
        return int(self.session.scalar(query) or 0)

    def is_member(self, segment: Segment, user_id: str) -> bool:
        query = select(SegmentMember.user_id).where(
            SegmentMember.segment_id == segment.id, SegmentMember.user_id == user_id
        )
        return self.session.scalar(query) is not None

    def as_dict(self, segment: Segment) -> dict[str, Any]:
        count = self.member_count(segment) if segment.kind == "members" else None
        return segment.to_dict(member_count=count)

    def create(
        self,
        name: str,
        condition: object | None,
        description: str = "",
        priority: int = 100,
    ) -> Segment:
        """A condition segment, or an empty member list when condition is None."""
        validate.name("segment", name)
        validate.priority(priority)
        if self.session.scalar(select(Segment.id).where(Segment.name == name)) is not None:
            raise Conflict(f"segment {name!r} already exists; pick another name or update it")
        segment = Segment(
            name=name,
            description=description,
            kind="members" if condition is None else "condition",
            condition=None if condition is None else _condition(condition),
            priority=priority,
        )
        self.session.add(segment)
        self.session.flush()
        audit.record(
            self.session,
            self.actor,
            "create",
            "segment",
            segment.id,
            name,
            None,
            self.as_dict(segment),
        )
        return segment

    def update(
        self,
        name: str,
        expected_version: int | None = None,
        new_name: str | None = None,
        description: str | None = None,
        condition: object | None = None,
        priority: int | None = None,
    ) -> Segment:
        segment = self.get(name)
        check_version("segment", name, segment.version, expected_version)
        before = self.as_dict(segment)
        if new_name is not None and new_name != name:
            validate.name("segment", new_name)
            if self.session.scalar(select(Segment.id).where(Segment.name == new_name)) is not None:
                raise Conflict(f"segment {new_name!r} already exists; pick another name")
            segment.name = new_name
        if condition is not None:
            if segment.kind != "condition":
                raise InvalidInput(
                    f"segment {name!r} is a member list; change its members with "
                    "`discountctl segments import-members`"
                )
            segment.condition = _condition(condition)
        if description is not None:
            segment.description = description
        if priority is not None:
            segment.priority = validate.priority(priority)
        if not self.session.is_modified(segment):
            return segment  # nothing to change: no new version, no audit entry (as for rules)
        segment.updated_at = utcnow()
        self.session.flush()
        audit.record(
            self.session,
            self.actor,
            "update",
            "segment",
            segment.id,
            segment.name,
            before,
            self.as_dict(segment),
        )
        return segment

    def delete(self, name: str, expected_version: int | None = None) -> dict[str, Any]:
        # Locked before the check of who uses it: a rule or experiment naming it at the same
        # moment is waited for and then named here, or waits and finds it gone, where both
        # read before the other wrote and one failed on the foreign key.
        segment = self.get(name, for_update=True)
        check_version("segment", name, segment.version, expected_version)
        experiments = self.session.execute(
            select(Experiment.key, Experiment.status).where(
                Experiment.target_segment_id == segment.id
            )
        ).all()
        users = [
            f"rule {r!r}"
            for r in self.session.scalars(select(Rule.name).where(Rule.segment_id == segment.id))
        ] + [f"{status} experiment {k!r}" for k, status in experiments]
        if users:
            has_run = any(status != "draft" for _, status in experiments)
            raise Conflict(
                f"segment {name!r} is used by {', '.join(users)}; "
                + (
                    "an experiment that has run keeps its target as the record its report "
                    "reads, so the segment stays"
                    if has_run
                    else "change or delete those first"
                )
            )
        before = self.as_dict(segment)
        self.session.execute(delete(SegmentMember).where(SegmentMember.segment_id == segment.id))
        self.session.delete(segment)
        self.session.flush()
        audit.record(
            self.session, self.actor, "delete", "segment", before["id"], name, before, None
        )
        return before

    def import_members(
        self, name: str, user_ids: Iterable[str], replace: bool = False
    ) -> tuple[Segment, int]:
        """Add (or with replace, set) the members of a member-list segment; returns (segment,
        number of ids newly added). Replacing with no ids empties the list.

        Two imports into one segment take turns (the segment's row is locked), so the second
        reads the members the first added: each read the members before the other wrote, and
        one failed on an id both added (a duplicate key), or on the segment's new version."""
        segment = self.get(name, for_update=True)
        if segment.kind != "members":
            raise InvalidInput(
                f"segment {name!r} is defined by a condition; only member-list segments "
                "(created without --condition/--where) take imported members"
            )
        wanted = list(dict.fromkeys(validate.ident("user id", u) for u in user_ids))
        if not wanted and not replace:
            raise InvalidInput("no user ids to import; the file has no rows")
        existing = set(
            self.session.scalars(
                select(SegmentMember.user_id).where(SegmentMember.segment_id == segment.id)
            )
        )
        new = [u for u in wanted if u not in existing]
        if not new and (not replace or existing == set(wanted)):
            return segment, 0  # nothing to change: no new version, no audit entry (as for rules)
        before = self.as_dict(segment)
        if replace:
            self.session.execute(
                delete(SegmentMember).where(SegmentMember.segment_id == segment.id)
            )
        added = wanted if replace else new
        # Executemany, not an ORM object per member (200,000 members took 21 s that way), in
        # chunks: a million members' parameter rows at once held about 1 GB.
        for start in range(0, len(added), INSERT_CHUNK):
            chunk = added[start : start + INSERT_CHUNK]
            self.session.execute(
                insert(SegmentMember), [{"segment_id": segment.id, "user_id": u} for u in chunk]
            )
        segment.updated_at = utcnow()
        self.session.flush()
        audit.record(
            self.session,
            self.actor,
            "import_members",
            "segment",
            segment.id,
            name,
            before,
            self.as_dict(segment),
        )
        return segment, len(new)


def _condition(raw: object) -> dict[str, Any]:
    try:
        return to_json(parse_condition(raw))
    except ConditionError as e:
        raise InvalidInput(f"invalid segment condition: {e}") from None
