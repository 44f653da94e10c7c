"""`discountctl experiments ...`"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from admin.app import App
from admin.options import confirm, if_version_option, parse_pairs, yes_option
from admin.output import emit, message, output_option, updated
from core.features import FEATURE_NAMES
from core.offers import FeatureError, resolve_features
from core.store.errors import InvalidInput
from core.store.experiments import Experiments, VariantSpec
from core.store.tables import Experiment, Rule

COLUMNS = ("key", "status", "target_segment", "variants", "started_at", "ended_at", "version")

variant_option = click.option(
    "--variant",
    "variants",
    multiple=True,
    metavar="NAME:WEIGHT[:RULE]",
    help="A variant, its weight (all sum to 100) and its rule; no rule means no discount. "
    "The first variant is the control. Repeat with the same NAME and WEIGHT and another RULE "
    "for a variant of several rules: per item the highest-priority one that applies prices.",
)


@click.group()
def experiments() -> None:
    """A/B experiments: variants with weights, each a set of rules or no discount."""


def _variants(values: tuple[str, ...]) -> list[VariantSpec]:
    """The --variant values, one spec per NAME in order of first appearance; a NAME repeated
    adds a rule to its variant (rule names may hold any printable character, so a variant's
    rules are not written in one value)."""
    weights: dict[str, int] = {}
    rules: dict[str, list[str]] = {}
    for value in values:
        # Rule names may hold ':' themselves, so only the first two separators count.
        parts = value.split(":", 2)
        if len(parts) < 2:
            raise InvalidInput(f"--variant {value!r}: write NAME:WEIGHT or NAME:WEIGHT:RULE")
        name = parts[0]
        try:
            weight = int(parts[1])
        except ValueError:
            raise InvalidInput(
                f"--variant {value!r}: weight {parts[1]!r} is not an integer"
            ) from None
        rule = parts[2] if len(parts) == 3 else None
        if name in weights:
            if weights[name] != weight:
                raise InvalidInput(
                    f"--variant {value!r}: variant {name!r} was given weight {weights[name]} "
                    "before; repeat a variant only to add a rule, with the same weight"
                )
            if rule is None or not rules[name]:
                raise InvalidInput(
                    f"--variant {value!r}: variant names must be unique, and {name!r} is given "
                    "twice; repeat a variant only to add a rule, each time with a RULE "
                    "(NAME:WEIGHT:RULE)"
                )
            if rule in rules[name]:
                raise InvalidInput(
                    f"--variant {value!r}: rule {rule!r} is given twice for variant {name!r}; "
                    "name each rule of a variant once"
                )
        weights.setdefault(name, weight)
        rules.setdefault(name, []).extend([] if rule is None else [rule])
    return [VariantSpec(name, weights[name], tuple(rules[name])) for name in weights]


def _table_row(data: dict[str, Any]) -> dict[str, Any]:
    variants = ", ".join(
        f"{v['name']}:{v['weight']}" + (f"({', '.join(v['rules'])})" if v["rules"] else "")
        for v in data["variants"]
    )
    return {**data, "variants": variants}


def _emit_experiment(data: dict[str, Any], output: str) -> None:
    """JSON keeps the variants as objects; a table shows them in one column."""
    emit(data if output == "json" else _table_row(data), output)


@experiments.command("create")
@click.argument("key")
@variant_option
@click.option("--target-segment", help="Only users in this segment take part.")
@click.option("--salt", help="Hash salt (default: random); reuse one to reproduce a split.")
@click.option("--description", default="", help="Free text for people.")
@output_option
@click.pass_obj
def create(
    app: App,
    key: str,
    variants: tuple[str, ...],
    target_segment: str | None,
    salt: str | None,
    description: str,
    output: str,
) -> None:
    """Create an experiment as a draft. From now until it stops, the rules its variants name
    price only through them: nobody gets them as ordinary rules (a note names each).

    \b
    Example:
      discountctl experiments create new-tiered-ab --target-segment new-customers \\
        --variant control:50 --variant treatment:50:new-tiered
      discountctl experiments create program-ab --variant control:50 \\
        --variant program:50:new-20 --variant program:50:others-5
    """
    with app.transaction() as session:
        experiment = Experiments(session, app.actor).create(
            key, _variants(variants), salt, target_segment, description
        )
        data = experiment.to_dict()
        notes = _narrower_rules(experiment) + _taken(Experiments(session).rules_only_of(experiment))
    message(
        f"created experiment {key!r} (draft); start it with `discountctl experiments start {key}`"
    )
    for note in notes:
        message(note)
    _emit_experiment(data, output)


def _taken(rules: list[Rule]) -> list[str]:
    """A note per ordinary rule an experiment now holds."""
    return [
        f"note: rule {rule.name!r} now prices only through this experiment's variants (and "
        "those of any other not yet stopped): nobody gets it as an ordinary rule, not before the "
        "start, while paused or in the control arm"
        for rule in rules
    ]


def _released(rules: list[Rule]) -> list[str]:
    """A note per rule an experiment held that prices as an ordinary rule again."""
    return [
        f"note: rule {rule.name!r} prices as an ordinary rule again: everyone its scope covers "
        f"gets it from now on; `discountctl rules disable {rule.name}` unless you mean to roll "
        "it out"
        for rule in rules
        if rule.enabled
    ]


def _not_yet_valid(experiment: Experiment) -> list[str]:
    """A note per variant rule whose window has not begun: until it does, the users and items
    it would price get the variant's other rules that have begun, or no discount, while the
    experiment keeps assigning users to the arm."""
    now = datetime.now(UTC)
    notes = []
    for v in experiment.variants:
        rules = v.in_order()
        for rule in rules:
            if rule.valid_from is None or rule.valid_from <= now:
                continue
            # Those not begun either price nothing meanwhile (start refused disabled or ended).
            others = [
                r.name
                for r in rules
                if r is not rule and (r.valid_from is None or r.valid_from <= now)
            ]
            instead = (
                "its users get no discount"
                if not others
                else f"what it would price gets the variant's other rules ({_names(others)}) "
                "where they apply, else no discount"
            )
            notes.append(
                f"note: variant {v.name!r} prices with rule {rule.name!r}, valid only from "
                f"{rule.valid_from.isoformat()}: until then {instead} "
                "(VARIANT_RULE_NOT_APPLICABLE) while the experiment assigns them"
            )
    return notes


def _narrower_rules(experiment: Experiment) -> list[str]:
    """A note per variant whose rules together reach fewer users than the experiment: its arm
    holds users no rule of it prices (core.offers: a variant never widens its rules'
    segments)."""
    target = experiment.target_segment
    notes = []
    for variant in experiment.variants:
        rules = variant.in_order()
        if not rules or any(r.segment is None or r.segment is target for r in rules):
            continue
        segments = sorted({r.segment.name for r in rules if r.segment is not None})
        if len(rules) == 1:
            which = f"rule {rules[0].name!r}, which reaches only segment {segments[0]!r}"
        else:
            which = (
                f"rules {_names([r.name for r in rules])}, which reach only segment(s) "
                f"{_names(segments)}"
            )
        limit = "that segment" if len(segments) == 1 else "one segment"
        notes.append(
            f"note: variant {variant.name!r} prices with {which}; the variant's other users get "
            f"no discount (--target-segment limits the experiment to {limit})"
        )
    return notes


def _names(names: list[str]) -> str:
    return ", ".join(map(repr, names))


@experiments.command("list")
@output_option
@click.pass_obj
def list_(app: App, output: str) -> None:
    """List experiments.

    \b
    Example:
      discountctl experiments list --output json
    """
    with app.transaction() as session:
        data = [e.to_dict() for e in Experiments(session).list_all()]
    emit(data if output == "json" else [_table_row(d) for d in data], output, COLUMNS)


@experiments.command("show")
@click.argument("key")
@output_option
@click.pass_obj
def show(app: App, key: str, output: str) -> None:
    """Show one experiment.

    \b
    Example:
      discountctl experiments show new-tiered-ab
    """
    with app.transaction() as session:
        data = Experiments(session).get(key).to_dict()
    _emit_experiment(data, output)


@experiments.command("update")
@click.argument("key")
@variant_option
@click.option("--target-segment", help="Only users in this segment take part.")
@click.option("--description", help="Free text for people.")
@if_version_option
@output_option
@click.pass_obj
def update(
    app: App,
    key: str,
    variants: tuple[str, ...],
    target_segment: str | None,
    description: str | None,
    if_version: int | None,
    output: str,
) -> None:
    """Change a draft experiment (variants and target are fixed once it has started). A rule
    the new variants name is held by the experiment, one they no longer name is released: a
    note names each.

    \b
    Example:
      discountctl experiments update new-tiered-ab \\
        --variant control:20 --variant treatment:80:new-tiered
    """
    with app.transaction() as session:
        repo = Experiments(session, app.actor)
        before = repo.get(key)
        version, held = before.version, repo.rules_only_of(before)
        experiment = repo.update(
            key, if_version, _variants(variants) if variants else None, target_segment, description
        )
        data = experiment.to_dict()
        holds = repo.rules_only_of(experiment)
    updated("experiment", key, version, data["version"])
    before_ids, after_ids = {r.id for r in held}, {r.id for r in holds}
    taken = [r for r in holds if r.id not in before_ids]
    for note in _taken(taken) + _released([r for r in held if r.id not in after_ids]):
        message(note)
    _emit_experiment(data, output)


def _move(app: App, key: str, command: str, if_version: int | None, output: str) -> None:
    with app.transaction() as session:
        repo = Experiments(session, app.actor)
        experiment = repo.transition(key, command, if_version)
        data = experiment.to_dict()
        notes = []
        if command == "start":
            notes = (
                _narrower_rules(experiment)
                + _not_yet_valid(experiment)
                + _shared_users(repo, experiment)
            )
        if command == "stop":
            notes = _released(repo.rules_only_of(experiment))
    message(f"experiment {key!r} is {data['status']}")
    for note in notes:
        message(note)
    _emit_experiment(data, output)


@experiments.command("start")
@click.argument("key")
@if_version_option
@output_option
@click.pass_obj
def start(app: App, key: str, if_version: int | None, output: str) -> None:
    """Start (or resume) an experiment: the server begins assigning users to variants.

    Running experiments that share users keep them in the order they first started: one started
    later never takes users from one that is measuring them, but a resumed one takes back the
    users it shares with those started after it. A note names each it shares with, and each
    variant rule whose validity window has not begun (until then what it would price gets the
    variant's other rules that have begun, if any, else no discount).

    \b
    Example:
      discountctl experiments start new-tiered-ab
    """
    _move(app, key, "start", if_version, output)


@experiments.command("pause")
@click.argument("key")
@if_version_option
@output_option
@click.pass_obj
def pause(app: App, key: str, if_version: int | None, output: str) -> None:
    """Pause a running experiment: until it starts again, its users get the ordinary rules, or
    another running experiment whose target holds them. Its variants' rules are no ordinary
    rules: while paused they price nobody.

    \b
    Example:
      discountctl experiments pause new-tiered-ab
    """
    _move(app, key, "pause", if_version, output)


@experiments.command("stop")
@click.argument("key")
@if_version_option
@yes_option
@output_option
@click.pass_obj
def stop(app: App, key: str, if_version: int | None, yes: bool, output: str) -> None:
    """Stop an experiment for good; a stopped experiment cannot restart. Its variants' rules
    become ordinary rules again (unless another experiment not yet stopped uses them): a note
    names each, to disable unless it is to be rolled out.

    \b
    Example:
      discountctl experiments stop new-tiered-ab --yes
    """
    with app.transaction() as session:
        Experiments(session).movable(key, "stop")  # refused before asking, not after
    confirm(f"Stop experiment {key!r} for good?", yes)
    _move(app, key, "stop", if_version, output)


@experiments.command("delete")
@click.argument("key")
@if_version_option
@yes_option
@output_option
@click.pass_obj
def delete(app: App, key: str, if_version: int | None, yes: bool, output: str) -> None:
    """Delete a draft experiment; one that has run stays, as the record its report reads. The
    rules its variants held become ordinary rules again: a note names each.

    \b
    Example:
      discountctl experiments delete homepage-test --yes
    """
    with app.transaction() as session:
        Experiments(session).deletable(key)
    confirm(f"Delete experiment {key!r}?", yes)
    with app.transaction() as session:
        repo = Experiments(session, app.actor)
        released = repo.rules_only_of(repo.get(key))
        data = repo.delete(key, if_version)
    message(f"deleted experiment {key!r}")
    for note in _released(released):
        message(note)
    _emit_experiment(data, output)


@experiments.command("assign")
@click.argument("key")
@click.argument("user_id")
@click.option(
    "--feature",
    "features",
    multiple=True,
    metavar="NAME=VALUE",
    help="A user feature, to check a condition target segment (repeat); unless every feature "
    "the condition reads is given, it is not checked and in_target is null.",
)
@output_option
@click.pass_obj
def assign(app: App, key: str, user_id: str, features: tuple[str, ...], output: str) -> None:
    """Show the variant USER_ID gets, by the same hash the server uses.

    \b
    Example:
      discountctl experiments assign new-tiered-ab 17850 --feature days_since_first_order=12
    """
    parsed = _features(features)
    with app.transaction() as session:
        data = Experiments(session).assign(key, user_id, parsed if features else None)
    if data["served_by"] is not None:
        message(
            f"{user_id!r} is in the target of {data['served_by']!r}, a running experiment that "
            f"started first and keeps its users: the server gives this user that one"
        )
    if data["in_target"] is None:
        message(
            f"target segment {data['target_segment']!r} is a condition; pass --feature "
            "NAME=VALUE for every feature it reads to check it (the variant shown applies if "
            "the user is in it)"
        )
    emit(data, output)


def _shared_users(repo: Experiments, started: Experiment) -> list[str]:
    """Notes on the running experiments that may share users with one just started: a user
    both target goes to the one that started first (the server's order)."""
    notes = []
    running = repo.running()
    position = {e.key: n for n, e in enumerate(running)}
    for other in running:
        if other.key == started.key:
            continue
        earlier = position[other.key] < position[started.key]
        first, second = (other, started) if earlier else (started, other)
        if first.target_segment is None or first.target_segment == second.target_segment:
            whom = f"every user of {second.key!r}"
            effect = f"{second.key!r} gets nobody until {first.key!r} pauses or stops"
        else:
            whom = f"the users in both targets ({_target(first)} and {_target(second)})"
            effect = f"{second.key!r} gets only the rest"
        moved = "" if first is other else f"; they leave {second.key!r} now"
        notes.append(f"note: {first.key!r} started first and keeps {whom}{moved}: {effect}")
    return notes


def _target(experiment: Experiment) -> str:
    segment = experiment.target_segment
    return "everyone" if segment is None else f"segment {segment.name!r}"


def _features(values: tuple[str, ...]) -> dict[str, float | str]:
    """The --feature values, read as the server reads context overrides (resolve_features)."""
    given = parse_pairs(values, "--feature")
    for name in given:
        if name not in FEATURE_NAMES:
            raise InvalidInput(f"--feature {name!r}: unknown; known: {', '.join(FEATURE_NAMES)}")
    try:
        resolved = resolve_features(None, given)
    except FeatureError as e:
        raise InvalidInput(f"--feature {e}") from None
    return {name: value for name, value in resolved.items() if name in given}
