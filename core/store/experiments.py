"""Experiments: variants with integer weights, a lifecycle, and deterministic assignment."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from core.assignment import WeightsError, bucket, check_weights, variant_index
from core.segments import evaluate, features_of, parse_condition
from core.store import audit, validate
from core.store.errors import Conflict, InvalidInput, NotFound
from core.store.rules import Rules
from core.store.segments import Segments, check_version
from core.store.tables import Experiment, Rule, Segment, Variant, VariantRule, utcnow

# status -> the statuses a command may move it to
TRANSITIONS = {
    "start": ({"draft", "paused"}, "running"),
    "pause": ({"running"}, "paused"),
    # A draft never ran: there is nothing to end, and a stopped one is kept forever as the record
    # its report reads, so a draft is deleted instead.
    "stop": ({"running", "paused"}, "stopped"),
}
# The PostgreSQL advisory lock that starts (and resumes) take, "expstart" in ASCII: see
# Experiments.transition.
START_LOCK = int.from_bytes(b"expstart", "big")


@dataclass(frozen=True)
class VariantSpec:
    name: str
    weight: int
    rules: tuple[str, ...] = ()  # rule names; none means no discount


class Experiments:
    """Repository: takes a Session and never commits; the caller owns the transaction."""

    def __init__(self, session: Session, actor: str = "system") -> None:
        self.session = session
        self.actor = actor

    def get(self, key: str) -> Experiment:
        experiment = self.session.scalar(select(Experiment).where(Experiment.key == key))
        if experiment is None:
            raise NotFound(f"no experiment with key {key!r}; see `discountctl experiments list`")
        return experiment

    def list_all(self) -> list[Experiment]:
        return list(self.session.scalars(select(Experiment).order_by(Experiment.key)))

    def create(
        self,
        key: str,
        variants: Sequence[VariantSpec],
        salt: str | None = None,
        target_segment: str | None = None,
        description: str = "",
    ) -> Experiment:
        validate.key("experiment key", key)
        if self.session.scalar(select(Experiment.id).where(Experiment.key == key)) is not None:
            raise Conflict(f"experiment {key!r} already exists; pick another key")
        # Whitespace and invisible characters would make a salt that cannot be typed back to
        # reproduce the split.
        if salt is not None and (
            not 1 <= len(salt) <= 64 or not salt.isprintable() or any(c.isspace() for c in salt)
        ):
            raise InvalidInput(
                f"salt {salt!r} must be 1-64 printable characters without spaces "
                "(or left out for a random one)"
            )
        experiment = Experiment(
            key=key,
            description=description,
            # A fresh salt per experiment, so that experiments do not split users the same way.
            salt=salt or secrets.token_hex(8),
            status="draft",
            target_segment=self._segment(target_segment),
            variants=self._variants(variants),
        )
        self.session.add(experiment)
        self.session.flush()
        audit.record(
            self.session,
            self.actor,
            "create",
            "experiment",
            experiment.id,
            key,
            None,
            experiment.to_dict(),
        )
        return experiment

    def update(
        self,
        key: str,
        expected_version: int | None = None,
        variants: Sequence[VariantSpec] | None = None,
        target_segment: str | None = None,
        description: str | None = None,
    ) -> Experiment:
        experiment = self.get(key)
        if variants is not None:
            # Another update at the same moment replaces the same variant rows: wait for it and,
            # if it got there first, refuse naming the versions. The write of this row's version,
            # which refuses a stale read too, comes only after the variant rows are replaced,
            # where the race showed as an SQLAlchemy warning and a unique or stale-row error.
            locked = select(Experiment.version).where(Experiment.id == experiment.id)
            now_at = self.session.scalar(locked.with_for_update())
            check_version("experiment", key, int(now_at or 0), experiment.version)
        check_version("experiment", key, experiment.version, expected_version)
        if experiment.status != "draft" and (variants is not None or target_segment is not None):
            raise InvalidInput(
                f"experiment {key!r} is {experiment.status}; variants and target segment can "
                "change only while it is a draft (create a new experiment instead)"
            )
        before = experiment.to_dict()
        if variants is not None:
            experiment.variants.clear()
            # Old rows go first, so (experiment, position) stays unique while the new ones land.
            self.session.flush()
            experiment.variants.extend(self._variants(variants))
        if target_segment is not None:
            experiment.target_segment = self._segment(target_segment)
        if description is not None:
            experiment.description = description
        if experiment.to_dict() == before:
            return experiment  # nothing to change: no new version, no audit entry (as for rules)
        experiment.updated_at = utcnow()
        self.session.flush()
        audit.record(
            self.session,
            self.actor,
            "update",
            "experiment",
            experiment.id,
            key,
            before,
            experiment.to_dict(),
        )
        return experiment

    def movable(self, key: str, command: str) -> Experiment:
        """The experiment, if its status lets command (start | pause | stop) move it."""
        experiment = self.get(key)
        allowed = TRANSITIONS[command][0]
        if experiment.status not in allowed:
            if experiment.status == "stopped" and command == "start":
                hint = "a stopped experiment cannot restart; create a new one"
            elif experiment.status == "stopped":
                hint = f"it has ended; there is nothing to {command}"
            elif command == "stop":
                hint = "it never ran, so there is nothing to stop; delete the draft instead"
            else:
                hint = f"it can {command} only from {' or '.join(sorted(allowed))}"
            raise InvalidInput(f"experiment {key!r} is {experiment.status}; {hint}")
        return experiment

    def transition(self, key: str, command: str, expected_version: int | None = None) -> Experiment:
        """start | pause | stop, with the lifecycle draft -> running <-> paused -> stopped."""
        target = TRANSITIONS[command][1]
        if target == "running" and self.session.get_bind().dialect.name == "postgresql":
            # One start at a time, to the end of its transaction: two started at the same
            # moment each saw the other still a draft, so neither noted the users they share,
            # and the one that started second got nobody without a word. (SQLite's write lock
            # refuses the second instead.)
            self.session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": START_LOCK})
        experiment = self.movable(key, command)
        check_version("experiment", key, experiment.version, expected_version)
        now = utcnow()
        if target == "running":
            # Read again and held (FOR SHARE) to the commit: a rule disabled at the same moment
            # is seen here and refused, or its `rules disable` waits and then notes this
            # experiment's variant, instead of neither seeing the other.
            rule_ids = {r.id for v in experiment.variants for r in v.rules}
            self.session.scalars(
                select(Rule)
                .where(Rule.id.in_(rule_ids))
                .with_for_update(read=True, of=Rule)
                .execution_options(populate_existing=True)
            ).all()
            for variant, rule in [(v, r) for v in experiment.variants for r in v.in_order()]:
                if not rule.enabled:
                    raise InvalidInput(
                        f"variant {variant.name!r} uses rule {rule.name!r}, which is disabled; "
                        f"enable it first (`discountctl rules enable {rule.name}`)"
                    )
                if rule.valid_until is not None and rule.valid_until <= now:
                    raise InvalidInput(
                        f"variant {variant.name!r} uses rule {rule.name!r}, whose validity ended "
                        f"at {rule.valid_until.isoformat()}; extend it first "
                        f"(`discountctl rules update {rule.name} --valid-until TIME`)"
                    )
        before = experiment.to_dict()
        experiment.status = target
        if target == "running" and experiment.started_at is None:
            experiment.started_at = now
        if target == "stopped":
            experiment.ended_at = now
        experiment.updated_at = now
        self.session.flush()
        audit.record(
            self.session,
            self.actor,
            command,
            "experiment",
            experiment.id,
            key,
            before,
            experiment.to_dict(),
        )
        return experiment

    def deletable(self, key: str) -> Experiment:
        """The experiment, if it never ran (a draft, or one an earlier build let a draft be
        stopped into): one that has run keeps the record its report reads."""
        experiment = self.get(key)
        if experiment.started_at is not None:
            raise Conflict(
                f"experiment {key!r} is {experiment.status}; only a draft can be deleted, since "
                "one that has run keeps the record its report reads"
            )
        return experiment

    def delete(self, key: str, expected_version: int | None = None) -> dict[str, Any]:
        experiment = self.deletable(key)
        check_version("experiment", key, experiment.version, expected_version)
        before = experiment.to_dict()
        self.session.delete(experiment)
        self.session.flush()
        audit.record(
            self.session, self.actor, "delete", "experiment", before["id"], key, before, None
        )
        return before

    def running_variants_of(self, rule: Rule) -> list[tuple[str, Variant]]:
        """(experiment key, variant) of every running experiment's variant priced by rule."""
        query = (
            select(Experiment.key, Variant)
            .join(Variant)
            .join(VariantRule)
            .where(VariantRule.rule_id == rule.id, Experiment.status == "running")
            .order_by(Experiment.key, Variant.position)
        )
        return [(key, variant) for key, variant in self.session.execute(query)]

    def running_variants_scoped_by(self, segment: Segment) -> list[tuple[str, str, str]]:
        """(experiment key, variant name, rule name) of every running experiment's variant
        whose rule the segment scopes."""
        query = (
            select(Experiment.key, Variant.name, Rule.name)
            .select_from(Experiment)
            .join(Variant, Variant.experiment_id == Experiment.id)
            .join(VariantRule, VariantRule.variant_id == Variant.id)
            .join(Rule, Rule.id == VariantRule.rule_id)
            .where(Rule.segment_id == segment.id, Experiment.status == "running")
            .order_by(Rule.name, Experiment.key, Variant.position)
        )
        return [(key, variant, rule) for key, variant, rule in self.session.execute(query)]

    def assign(
        self, key: str, user_id: str, features: Mapping[str, float | str] | None = None
    ) -> dict[str, Any]:
        """The variant this user gets, by the hash the server uses.

        Targeting: a member-list segment is checked in the store; a condition segment only when
        ``features`` holds every feature it reads (the CLI has no feature store), else
        ``in_target`` is None.
        """
        validate.ident("user id", user_id)
        experiment = self.get(key)
        segment = experiment.target_segment
        in_target = self._in_target(experiment, user_id, features)
        variants = experiment.variants
        chosen = variants[variant_index(experiment.salt, user_id, [v.weight for v in variants])]
        served: bool | None = in_target if experiment.status == "running" else False
        served_by = None
        for earlier in self.running_before(experiment) if served is not False else ():
            held = self._in_target(earlier, user_id, features)
            if held:
                served, served_by = False, earlier.key
                break
            if held is None:
                served = None
        return {
            "experiment": key,
            "status": experiment.status,
            "user_id": user_id,
            "bucket": bucket(experiment.salt, user_id),
            "variant": chosen.name,
            "rules": [r.name for r in chosen.in_order()],
            "target_segment": segment.name if segment is not None else None,
            "in_target": in_target,
            # Whether the server gives this user the variant now: running, in the target, and
            # in no running experiment that started earlier (served_by names it).
            "served": served,
            "served_by": served_by,
        }

    def running_before(self, experiment: Experiment) -> list[Experiment]:
        """The running experiments that started before this running one: they keep the users
        they share with it."""
        running = self.running()
        return running[: [e.key for e in running].index(experiment.key)]

    def holders(self) -> dict[int, list[str]]:
        """Rule id → keys of the experiments not yet stopped whose variants price with it: such
        a rule prices only through them (core.offers.RuleDef.experiment_only)."""
        query = (
            select(VariantRule.rule_id, Experiment.key)
            .join(Variant, Variant.id == VariantRule.variant_id)
            .join(Experiment, Experiment.id == Variant.experiment_id)
            .where(Experiment.status != "stopped")
            .distinct()
            .order_by(Experiment.key)
        )
        held: dict[int, list[str]] = {}
        for rule_id, key in self.session.execute(query):
            held.setdefault(rule_id, []).append(key)
        return held

    def rules_only_of(self, experiment: Experiment) -> list[Rule]:
        """The rules of experiment's variants that no other experiment not yet stopped prices
        with: whether they are ordinary rules follows this experiment's state alone."""
        held = self.holders()
        rules = {r.id: r for v in experiment.variants for r in v.rules}
        return sorted(
            (r for i, r in rules.items() if set(held.get(i, ())) <= {experiment.key}),
            key=lambda r: r.name,
        )

    def running(self) -> list[Experiment]:
        """Running experiments in the order the server tries them (core.store.snapshot): the
        first started first, so starting another never moves users out of one that is
        measuring them."""
        query = select(Experiment).where(Experiment.status == "running")
        return list(self.session.scalars(query.order_by(Experiment.started_at, Experiment.key)))

    def _in_target(
        self, experiment: Experiment, user_id: str, features: Mapping[str, float | str] | None
    ) -> bool | None:
        """A member-list segment is checked in the store; a condition segment only when
        ``features`` holds every feature it reads, else None."""
        segment = experiment.target_segment
        if segment is None:
            return True
        if segment.kind == "members":
            return Segments(self.session).is_member(segment, user_id)
        assert segment.condition is not None
        condition = parse_condition(segment.condition)
        # Judged only on features given: a missing one would be taken as a new user's, and
        # the answer stated with a confidence nobody has.
        known = features is not None and features_of(condition) <= set(features)
        return evaluate(condition, features) if known and features else None

    def _segment(self, name: str | None) -> Segment | None:
        return None if name is None else Segments(self.session).get(name, for_reference=True)

    def _variants(self, specs: Sequence[VariantSpec]) -> list[Variant]:
        names = [s.name for s in specs]
        for n in names:
            validate.key("variant name", n)
        if len(set(names)) != len(names):
            raise InvalidInput(f"variant names must be unique, got {', '.join(names)}")
        if len(specs) < 2:
            raise InvalidInput(
                "an experiment needs at least two variants (e.g. control and treatment)"
            )
        try:
            check_weights([s.weight for s in specs])
        except WeightsError as e:
            raise InvalidInput(str(e)) from None
        # A split allows it, an experiment does not: a variant nobody is assigned to measures
        # nothing, and an empty control leaves the others nothing to be compared with.
        empty = [s.name for s in specs if s.weight == 0]
        if empty:
            raise InvalidInput(
                f"variant(s) {', '.join(map(repr, empty))} have weight 0: nobody would be "
                "assigned to them; give every variant a weight of at least 1, or leave it out"
            )
        for s in specs:
            twice = sorted({r for r in s.rules if s.rules.count(r) > 1})
            if twice:
                raise InvalidInput(
                    f"variant {s.name!r} names rule(s) {', '.join(map(repr, twice))} more than "
                    "once; name each rule of a variant once"
                )
        rules = Rules(self.session)
        return [
            Variant(
                position=i,
                name=s.name,
                weight=s.weight,
                # Locked against a `rules delete` at the same moment (core.store.segments.locked).
                rules=[rules.get(r, for_reference=True) for r in s.rules],
            )
            for i, s in enumerate(specs)
        ]
