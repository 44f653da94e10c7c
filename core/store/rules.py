"""Discount rules: scope, policy and parameters, guardrails, validity window, priority."""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Numeric, Table, select
from sqlalchemy.orm import Session

from core.policy import Guardrails, PolicyError, check_draws, check_percents, validate_params
from core.store import audit, validate
from core.store.errors import Conflict, InvalidInput, NotFound
from core.store.segments import Segments, check_version, locked
from core.store.tables import Experiment, Rule, Variant, VariantRule, tried_order, utcnow

DEFAULTS: dict[str, Any] = {
    "description": "",
    "segment": None,
    "categories": [],
    "item_ids": [],
    "max_discount_pct": 30.0,
    "min_margin_pct": 0.0,
    "budget": None,
    "valid_from": None,
    "valid_until": None,
    "priority": 0,
    "enabled": True,
}
FIELDS = frozenset(DEFAULTS) | {"policy", "params"}
# The budget column's NUMERIC(p, s): PostgreSQL rounds a value to s decimals and refuses one
# above the largest it holds, while SQLite stores either as given; refused here, so both
# store exactly what the caller (and the audit log) saw.
_BUDGET = cast(Numeric[float], cast(Table, Rule.__table__).columns["budget"].type)
BUDGET_DECIMALS = _BUDGET.scale or 0
MAX_BUDGET = (
    Decimal(10) ** ((_BUDGET.precision or 0) - BUDGET_DECIMALS) - Decimal(10) ** -BUDGET_DECIMALS
)


class Rules:
    """Repository: takes a Session and never commits; the caller owns the transaction."""

    def __init__(self, session: Session, actor: str = "system") -> None:
        self.session = session
        self.actor = actor

    def get(self, name: str, for_update: bool = False, for_reference: bool = False) -> Rule:
        """for_update, for_reference: see core.store.segments.locked."""
        query = select(Rule).where(Rule.name == name)
        rule = self.session.scalar(locked(query, for_update, for_reference))
        if rule is None:
            raise NotFound(f"no rule named {name!r}; see `discountctl rules list`")
        return rule

    def list_all(self) -> list[Rule]:
        """In the order they are tried (tables.tried_order)."""
        return sorted(self.session.scalars(select(Rule)), key=tried_order)

    def create(self, name: str, policy: str, params: object, **fields: Any) -> Rule:
        """fields: any of DEFAULTS' keys; ``segment`` is a segment name."""
        validate.name("rule", name)
        _unknown(fields)
        if self.session.scalar(select(Rule.id).where(Rule.name == name)) is not None:
            raise Conflict(f"rule {name!r} already exists; pick another name or update it")
        values = self._validated({**DEFAULTS, **fields, "policy": policy, "params": params})
        _check_choices(values)
        rule = Rule(name=name, **values)
        self.session.add(rule)
        self.session.flush()
        audit.record(
            self.session, self.actor, "create", "rule", rule.id, name, None, rule.to_dict()
        )
        return rule

    def update(
        self,
        name: str,
        expected_version: int | None = None,
        new_name: str | None = None,
        action: str = "update",
        **changes: Any,
    ) -> Rule:
        """changes: any of FIELDS; a field left out keeps its value."""
        _unknown(changes, allowed=FIELDS)
        rule = self.get(name)
        check_version("rule", name, rule.version, expected_version)
        before = rule.to_dict()
        if new_name is not None and new_name != name:
            validate.name("rule", new_name)
            if self.session.scalar(select(Rule.id).where(Rule.name == new_name)) is not None:
                raise Conflict(f"rule {new_name!r} already exists; pick another name")
            rule.name = new_name
        current = {
            **{k: before[k] for k in DEFAULTS if k not in ("valid_from", "valid_until")},
            "valid_from": rule.valid_from,
            "valid_until": rule.valid_until,
            "policy": rule.policy,
            "params": rule.params,
        }
        values = self._validated({**current, **changes})
        # Only when what it chooses among changes: a rule stored before these checks must
        # still be disabled, or renamed, without first fixing its grid.
        if changes.keys() & {"policy", "params", "max_discount_pct"}:
            _check_choices(values)
        for key, value in values.items():
            setattr(rule, key, value)
        if not self.session.is_modified(rule):
            # Nothing to change: no new version, which would fail others' --if-version for
            # nothing, and no audit entry.
            return rule
        rule.updated_at = utcnow()
        self.session.flush()
        audit.record(
            self.session, self.actor, action, "rule", rule.id, rule.name, before, rule.to_dict()
        )
        return rule

    def set_enabled(self, name: str, enabled: bool, expected_version: int | None = None) -> Rule:
        action = "enable" if enabled else "disable"
        return self.update(name, expected_version, action=action, enabled=enabled)

    def delete(self, name: str, expected_version: int | None = None) -> dict[str, Any]:
        # Locked before the check of who uses it, as Segments.delete: an experiment naming it
        # at the same moment is waited for and then named here, or waits and finds it gone.
        rule = self.get(name, for_update=True)
        check_version("rule", name, rule.version, expected_version)
        used_by = list(
            self.session.scalars(
                select(Experiment.key)
                .join(Variant)
                .join(VariantRule)
                .where(VariantRule.rule_id == rule.id)
                .distinct()
            )
        )
        if used_by:
            raise Conflict(
                f"rule {name!r} is a variant of experiment(s) {', '.join(map(repr, used_by))}; "
                "a rule that an experiment measures cannot be deleted (disable it instead)"
            )
        before = rule.to_dict()
        self.session.delete(rule)
        self.session.flush()
        audit.record(self.session, self.actor, "delete", "rule", before["id"], name, before, None)
        return before

    def _validated(self, v: dict[str, Any]) -> dict[str, Any]:
        """Every column value of a rule, checked together (e.g. valid_from < valid_until)."""
        policy = v["policy"]
        try:
            params = validate_params(policy, v["params"])
        except PolicyError as e:
            raise InvalidInput(f"invalid policy parameters: {e}") from None
        max_pct = _number("max discount percent", v["max_discount_pct"])
        if not 0 <= max_pct < 100:
            raise InvalidInput(f"max discount percent must be in [0, 100), got {max_pct:g}")
        min_margin = _number("min margin percent", v["min_margin_pct"])
        if min_margin < 0:
            raise InvalidInput(f"min margin percent must be >= 0, got {min_margin:g}")
        budget = v["budget"]
        if budget is not None:
            budget = _number("budget", budget)
            if budget < 0:
                raise InvalidInput(f"budget must be >= 0 (or absent for no cap), got {budget:g}")
            # repr: the shortest text that reads back as this float, i.e. what was typed.
            exact = Decimal(repr(budget))
            if exact.as_tuple().exponent < -BUDGET_DECIMALS:  # type: ignore[operator]
                raise InvalidInput(
                    f"budget {budget!r} has more than {BUDGET_DECIMALS} decimals; give it in "
                    f"the currency's units to the cent, e.g. {exact:.{BUDGET_DECIMALS}f}"
                )
            if exact > MAX_BUDGET:
                raise InvalidInput(f"budget {budget!r} is above the largest allowed, {MAX_BUDGET}")
        valid_from, valid_until = v["valid_from"], v["valid_until"]
        for label, when in (("valid from", valid_from), ("valid until", valid_until)):
            if when is not None and (not isinstance(when, datetime) or when.tzinfo is None):
                raise InvalidInput(f"{label} must be a timezone-aware time, got {when!r}")
        if valid_from is not None and valid_until is not None and valid_from >= valid_until:
            raise InvalidInput(
                f"valid from ({valid_from.isoformat()}) must be before valid until "
                f"({valid_until.isoformat()})"
            )
        priority = validate.priority(v["priority"])
        segment = v["segment"]
        if segment is not None:
            # Locked against a `segments delete` at the same moment (Segments.get).
            segment = Segments(self.session).get(segment, for_reference=True)
        return {
            "description": str(v["description"]),
            "segment": segment,
            "categories": [
                validate.ident("category", c) for c in _strings("category", v["categories"])
            ],
            "item_ids": [validate.ident("item id", i) for i in _strings("item id", v["item_ids"])],
            "policy": policy,
            "params": params,
            "max_discount_pct": max_pct,
            "min_margin_pct": min_margin,
            "budget": budget,
            "valid_from": valid_from,
            "valid_until": valid_until,
            "priority": priority,
            "enabled": bool(v["enabled"]),
        }


def _unknown(fields: dict[str, Any], allowed: frozenset[str] = frozenset(DEFAULTS)) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise TypeError(f"unknown rule field(s): {', '.join(unknown)}")


def _number(label: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"{label} must be a finite number, got {value!r}")
    return float(value)


def _strings(label: str, values: object) -> list[str]:
    if not isinstance(values, list | tuple) or not all(isinstance(x, str) and x for x in values):
        raise InvalidInput(f"{label} list must hold non-empty strings, got {values!r}")
    return list(dict.fromkeys(values))


def _check_choices(values: dict[str, Any]) -> None:
    try:
        check_percents(values["policy"], values["params"])
        check_draws(values["policy"], values["params"], Guardrails.of(values["max_discount_pct"]))
    except PolicyError as e:
        raise InvalidInput(f"invalid policy parameters: {e}") from None
