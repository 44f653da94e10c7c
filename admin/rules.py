"""`discountctl rules ...`"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click
from sqlalchemy.orm import Session

from admin.app import App
from admin.options import (
    confirm,
    if_version_option,
    parse_assignments,
    parse_json,
    parse_time,
    yes_option,
)
from admin.output import emit, message, output_option, updated
from core.offers import in_window
from core.policy import POLICIES
from core.store.errors import InvalidInput
from core.store.experiments import Experiments
from core.store.rules import Rules
from core.store.tables import Rule, Variant, tried_order

COLUMNS = (
    "name",
    "enabled",
    "held_by",
    "priority",
    "segment",
    "policy",
    "params",
    "max_discount_pct",
    "min_margin_pct",
    "budget",
    "version",
)
CLEARABLE = ("segment", "categories", "item_ids", "budget", "valid_from", "valid_until")


@click.group()
def rules() -> None:
    """Discount rules: who and what they apply to, the policy, guardrails and validity."""


def _rule_options(create: bool) -> Callable[[Any], Any]:
    """The options create and update share; on update every one is optional."""
    options = [
        click.option(
            "--policy",
            type=click.Choice(POLICIES),
            required=create,
            help="tiered_topk: the k1 best-ranked items get d1%, the rest d2%; threshold: "
            "score >= t gets d%; linear: d = a*score + b clipped to [min, max]; optimal: per "
            "item, the grid percent (e.g. grid=[5,10,15,20]) or none with the largest expected "
            "margin under discountd's response model; randomized: per item, a percent drawn "
            "uniformly among the grid and none that the guardrails allow, to learn what a "
            "discount does (discountctl offers export).",
        ),
        click.option(
            "--param",
            "param_pairs",
            multiple=True,
            metavar="NAME=VALUE",
            help="A policy parameter, e.g. --param k1=3 --param d1=15 --param d2=5.",
        ),
        click.option("--params", "params_json", metavar="JSON", help="All parameters as JSON."),
        click.option("--segment", help="Only users in this segment (default: everyone)."),
        click.option(
            "--category", "categories", multiple=True, help="Only these categories (repeat)."
        ),
        click.option("--item", "item_ids", multiple=True, help="Only these item ids (repeat)."),
        click.option(
            "--max-discount",
            type=float,
            default=30.0 if create else None,
            show_default=create,
            help="Guardrail: never more than this percent off.",
        ),
        click.option(
            "--min-margin",
            type=float,
            default=0.0 if create else None,
            show_default=create,
            help="Guardrail: final price >= cost * (1 + this/100).",
        ),
        click.option(
            "--budget",
            type=float,
            help="Discount money redeemed under this rule after which it grants no more, in "
            "the currency's units as the catalog's prices (5000 is 5,000.00, not the API's "
            "cents; at most 2 decimals); a soft cap: offers issued before the server sees it "
            "spent can still be redeemed (docs/OFFERS.md, Budget).",
        ),
        click.option("--valid-from", metavar="TIME", help="ISO 8601; UTC when no zone is given."),
        click.option("--valid-until", metavar="TIME", help="ISO 8601; UTC when no zone is given."),
        click.option(
            "--priority",
            type=int,
            default=0 if create else None,
            show_default=create,
            help="Of the rules that apply to an item, the one with the largest number wins "
            "(segments go the other way: the lowest is tried first).",
        ),
        click.option("--description", help="Free text for people."),
    ]

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _fields(kw: dict[str, Any]) -> dict[str, Any]:
    """Store fields from the options that were given."""
    fields: dict[str, Any] = {}
    if kw["params_json"] is not None and kw["param_pairs"]:
        raise click.UsageError("give either --params or --param, not both")
    if kw["params_json"] is not None:
        # Whatever it reads as, null included, is the store's to judge: never left out.
        fields["params"] = parse_json(kw["params_json"], "--params")
    elif kw["param_pairs"]:
        fields["params"] = parse_assignments(kw["param_pairs"], "--param")
    if kw["policy"] is not None:
        fields["policy"] = kw["policy"]
    for option, field in (("max_discount", "max_discount_pct"), ("min_margin", "min_margin_pct")):
        if kw[option] is not None:
            fields[field] = kw[option]
    for key in ("segment", "budget", "priority", "description"):
        if kw[key] is not None:
            fields[key] = kw[key]
    for key in ("categories", "item_ids"):
        if kw[key]:
            fields[key] = list(kw[key])
    for key in ("valid_from", "valid_until"):
        if kw[key] is not None:
            fields[key] = parse_time(kw[key], "--" + key.replace("_", "-"))
    return fields


@rules.command("create")
@click.argument("name")
@_rule_options(create=True)
@click.option("--disabled", is_flag=True, help="Create it switched off.")
@output_option
@click.pass_obj
def create(app: App, /, name: str, disabled: bool, output: str, **kw: Any) -> None:
    """Create a rule.

    \b
    Example:
      discountctl rules create new-tiered --segment new-customers --policy tiered_topk \\
        --param k1=3 --param d1=15 --param d2=5 --max-discount 20 --min-margin 10
    """
    fields = _fields(kw)
    policy = fields.pop("policy")
    params = fields.pop("params", {})
    with app.transaction() as session:
        rule = Rules(session, app.actor).create(
            name, policy, params, enabled=not disabled, **fields
        )
        data = rule.to_dict()
    message(f"created rule {name!r}")
    _note_if_ended(data)
    emit(data, output)


@rules.command("list")
@output_option
@click.pass_obj
def list_(app: App, output: str) -> None:
    """List rules, highest priority first. HELD_BY names the experiments (not yet stopped)
    whose variants price with a rule: it prices only through them, as no ordinary rule.

    \b
    Example:
      discountctl rules list
    """
    with app.transaction() as session:
        held = Experiments(session).holders()
        data = [_with_holders(r, held) for r in Rules(session).list_all()]
    emit(data, output, COLUMNS)


def _with_holders(rule: Rule, held: dict[int, list[str]]) -> dict[str, Any]:
    """The rule, with the experiments that hold it (null: none, it is an ordinary rule)."""
    return {**rule.to_dict(), "held_by": held.get(rule.id)}


@rules.command("show")
@click.argument("name")
@output_option
@click.pass_obj
def show(app: App, name: str, output: str) -> None:
    """Show one rule.

    \b
    Example:
      discountctl rules show new-tiered --output json
    """
    with app.transaction() as session:
        data = _with_holders(Rules(session).get(name), Experiments(session).holders())
    emit(data, output)


@rules.command("update")
@click.argument("name")
@click.option("--name", "new_name", help="Rename the rule.")
@_rule_options(create=False)
@click.option(
    "--clear",
    multiple=True,
    type=click.Choice(CLEARABLE),
    help="Remove a scope limit, the budget or a validity bound (repeat).",
)
@if_version_option
@output_option
@click.pass_obj
def update(
    app: App,
    /,
    name: str,
    new_name: str | None,
    clear: tuple[str, ...],
    if_version: int | None,
    output: str,
    **kw: Any,
) -> None:
    """Change a rule; options left out keep their value. --param changes single parameters of
    the rule's policy, --params (or a new --policy) replaces them.

    \b
    Example:
      discountctl rules update new-tiered --param k1=3 --param d1=20 --param d2=5 --if-version 1
    """
    fields = _fields(kw)
    for key in clear:
        if key in fields:
            raise click.UsageError(f"--clear {key} contradicts the value given for it")
        fields[key] = [] if key in ("categories", "item_ids") else None
    with app.transaction() as session:
        repo = Rules(session, app.actor)
        current = repo.get(name)
        before = current.to_dict()
        new_policy = fields.get("policy", current.policy) != current.policy
        if new_policy and "params" not in fields:
            raise InvalidInput(
                f"--policy {fields['policy']} needs its own parameters, passed with --param K=V "
                f"(repeat) or --params JSON: the rule's ({', '.join(sorted(current.params))}) "
                f"are {current.policy}'s"
            )
        if kw["param_pairs"] and not new_policy:
            # --param changes one parameter of the same policy; --params replaces them all.
            fields["params"] = {**current.params, **fields["params"]}
        rule = repo.update(name, if_version, new_name, **fields)
        data = rule.to_dict()
        notes = _measured_notes(session, before, rule)
    updated("rule", data["name"], before["version"], data["version"])
    for note in notes:
        message(note)
    if data["valid_until"] != before["valid_until"] and not notes:
        _note_if_ended(data)
    emit(data, output)


def _measured_notes(session: Session, before: dict[str, Any], rule: Rule) -> list[str]:
    """A note per running experiment's variant that a change of its rule alters: the change is
    allowed (a rule that gives money away must be stoppable), but the experiment keeps
    assigning users to the variant, and `experiments start` would have refused a disabled rule."""
    after = rule.to_dict()
    now = datetime.now(UTC)
    was_live = before["enabled"] and _in_window(before, now)
    stopped = was_live and not (rule.enabled and _in_window(after, now))
    pricing = [f for f in PRICING_FIELDS if before[f] != after[f]]
    ordering = [f for f in ORDER_FIELDS if before[f] != after[f]]
    window = [f for f in ("valid_from", "valid_until") if before[f] != after[f]]
    if not stopped and not (rule.enabled and (pricing or ordering or window)):
        return []
    notes = []
    for key, variant in Experiments(session).running_variants_of(rule):
        # Only those live now take over what rule priced: naming a disabled one would hide that
        # the whole arm gets no discount.
        others = [
            r.name
            for r in variant.in_order()
            if r.id != rule.id and r.enabled and _in_window(r.to_dict(), now)
        ]
        changed = pricing + (ordering if _reordered(variant, rule, before) else [])
        if not stopped and not changed and not window:
            continue
        note = f"note: variant {variant.name!r} of running experiment {key!r} prices with rule "
        instead = (
            f"the variant's other rules ({', '.join(map(repr, others))}) where they apply, else "
            "no discount"
            if others
            else "no discount"
        )
        if stopped:
            why = "disabled" if not rule.enabled else "outside its validity window"
            whom = (
                "what it priced for the variant's users gets"
                if others
                else "the variant's users get"
            )
            note += (
                f"{rule.name!r}, which is now {why}: {whom} {instead} "
                "(VARIANT_RULE_NOT_APPLICABLE) while the experiment keeps assigning users to it; "
                f"pause the experiment (`discountctl experiments pause {key}`) or change the "
                "rule back"
            )
        elif changed:
            note += (
                f"{rule.name!r}, whose {', '.join(changed)} changed: from now on the variant's "
                "users get the new discounts, so the experiment's results mix the old rule and "
                "the new one"
            )
        elif after["valid_from"] is None and after["valid_until"] is None:
            note += (
                f"{rule.name!r}, whose validity window is now gone: the variant's users get its "
                "discounts at any time the experiment runs"
            )
        else:
            start, end = after["valid_from"] or "any time", after["valid_until"] or "no end"
            whom = "what it prices gets" if others else "the variant's users get"
            note += (
                f"{rule.name!r}, whose validity window is now {start} to {end}: outside it "
                f"{whom} {instead} "
                "(VARIANT_RULE_NOT_APPLICABLE) while the experiment keeps assigning users to it"
            )
        notes.append(note)
    return notes


def _reordered(variant: Variant, rule: Rule, before: dict[str, Any]) -> bool:
    """Whether rule's new priority or name moved it among the variant's rules: they decide which
    of them prices an item only through that order, so a change that keeps it prices every user
    as before."""
    was = sorted(
        variant.rules,
        key=lambda r: (-before["priority"], before["name"]) if r.id == rule.id else tried_order(r),
    )
    return [r.id for r in was] != [r.id for r in variant.in_order()]


# What decides a variant's discounts (its window only whether it prices at all, which has notes
# of its own).
PRICING_FIELDS = (
    "policy",
    "params",
    "segment",
    "categories",
    "item_ids",
    "max_discount_pct",
    "min_margin_pct",
    "budget",
)
# What decides which of a variant's several rules prices an item (core.offers).
ORDER_FIELDS = ("priority", "name")


def _note_if_ended(rule: dict[str, Any]) -> None:
    """A rule whose window has already closed prices nothing; say so now rather than leave it to
    `experiments start` or a quiet storefront."""
    end = rule["valid_until"]
    if end is not None and not _in_window({**rule, "valid_from": None}, datetime.now(UTC)):
        message(
            f"note: rule {rule['name']!r} ended at {end} (--valid-until): it prices nothing until "
            "its window is moved"
        )


def _in_window(fields: dict[str, Any], now: datetime) -> bool:
    """The server's judgement of a rule's window (core.offers.in_window), on to_dict's times."""
    start, end = (
        None if fields[f] is None else datetime.fromisoformat(fields[f])
        for f in ("valid_from", "valid_until")
    )
    return in_window(start, end, now)


def _toggle(enabled: bool) -> Callable[..., None]:
    verb = "enable" if enabled else "disable"

    @if_version_option
    @output_option
    @click.pass_obj
    def command(app: App, name: str, if_version: int | None, output: str) -> None:
        with app.transaction() as session:
            repo = Rules(session, app.actor)
            before = repo.get(name).to_dict()
            rule = repo.set_enabled(name, enabled, if_version)
            data = rule.to_dict()
            notes = _measured_notes(session, before, rule)
        if before["enabled"] == enabled:
            message(f"rule {name!r} is already {verb}d")
        else:
            message(f"{verb}d rule {name!r}")
        for note in notes:
            message(note)
        emit(data, output)

    command.__doc__ = f"""{verb.capitalize()} a rule.

    \b
    Example:
      discountctl rules {verb} new-tiered
    """
    return command


rules.command("enable")(click.argument("name")(_toggle(True)))
rules.command("disable")(click.argument("name")(_toggle(False)))


@rules.command("delete")
@click.argument("name")
@if_version_option
@yes_option
@output_option
@click.pass_obj
def delete(app: App, name: str, if_version: int | None, yes: bool, output: str) -> None:
    """Delete a rule. Refused while an experiment uses it; disable it instead.

    \b
    Example:
      discountctl rules delete old-rule --yes
    """
    with app.transaction() as session:
        repo = Rules(session, app.actor)
        repo.get(name)
        confirm(f"Delete rule {name!r}?", yes)
        data = repo.delete(name, if_version)
    message(f"deleted rule {name!r}")
    emit(data, output)
