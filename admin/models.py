"""`discountctl models ...`"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from sqlalchemy.orm import Session

from admin.app import App
from admin.options import confirm, yes_option
from admin.output import emit, message, output_option
from core.artifact import CURRENT, ArtifactError, current_version_dir, set_current
from core.offers import resolve_features
from core.segments import ConditionError, evaluate, parse_condition
from core.shop import load_shop_facts
from core.store.errors import InvalidInput
from core.store.experiments import Experiments
from core.store.model_versions import ModelVersions

COLUMNS = ("version", "status", "registered_at", "activated_at", "metrics", "path")


@click.group()
def models() -> None:
    """Model versions: register a trained artifact, promote it to serving, roll back."""


@models.command("register")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@output_option
@click.pass_obj
def register(app: App, directory: Path, output: str) -> None:
    """Register the model version in DIRECTORY after checking every file's sha256 against its
    manifest. It is staged; `models promote` makes it serve.

    \b
    Example:
      discountctl models register models/20261128-172400-ab12cd
    """
    with app.transaction() as session:
        data = ModelVersions(session, app.actor).register(directory).to_dict()
    message(f"registered model version {data['version']!r} (staged)")
    emit(data, output)


@models.command("list")
@output_option
@click.pass_obj
def list_(app: App, output: str) -> None:
    """List model versions, newest registration first.

    \b
    Example:
      discountctl models list
    """
    with app.transaction() as session:
        versions = ModelVersions(session)
        data = [m.to_dict() for m in versions.list_all()]
        active = versions.active()
    if active is not None:
        warn_if_served_elsewhere(active.path)
    emit(data, output, COLUMNS)


@models.command("promote")
@click.argument("version")
@output_option
@click.pass_obj
def promote(app: App, version: str, output: str) -> None:
    """Make VERSION the active model (re-verified first); the previous one is retired, and the
    model store's CURRENT file is pointed at VERSION, so running servers switch to it.

    \b
    Example:
      discountctl models promote 20261128-172400-ab12cd
    """
    with app.transaction() as session:
        versions = ModelVersions(session, app.actor)
        previous = versions.active()
        left = previous.path if previous is not None else None
        data = versions.promote(version).to_dict()
        targets = _condition_targets(session)
    _serve(data["path"], left)
    message(f"model version {version!r} is active")
    for note in _targets_moved(targets, left, data["path"]):
        message(note)
    emit(data, output)


@models.command("rollback")
@yes_option
@output_option
@click.pass_obj
def rollback(app: App, yes: bool, output: str) -> None:
    """Retire the active model and reactivate the one that was active before it; the model
    store's CURRENT file follows, so running servers switch back. It rolls back from the version
    it asked about: if another became active meanwhile, it is refused and nothing changes.

    \b
    Example:
      discountctl models rollback --yes
    """
    with app.transaction() as session:
        active = ModelVersions(session).active()
    if active is None:
        raise InvalidInput("no active model version to roll back from")
    warn_if_served_elsewhere(active.path)
    confirm(f"Roll back from model version {active.version!r}?", yes)
    with app.transaction() as session:
        # From the version confirmed, not from one a colleague promoted while the prompt waited.
        data = ModelVersions(session, app.actor).rollback(active.version).to_dict()
        targets = _condition_targets(session)
    _serve(data["path"], active.path)
    message(f"rolled back; model version {data['version']!r} is active")
    for note in _targets_moved(targets, active.path, data["path"]):
        message(note)
    emit(data, output)


def _condition_targets(session: Session) -> list[tuple[str, str, Any]]:
    """(experiment key, segment name, condition) of each running experiment whose target is a
    condition segment."""
    return [
        (e.key, e.target_segment.name, e.target_segment.condition)
        for e in Experiments(session).running()
        if e.target_segment is not None and e.target_segment.condition is not None
    ]


def _targets_moved(
    targets: list[tuple[str, str, Any]], before: str | None, after: str
) -> list[str]:
    """A note per running experiment whose target is a condition: the server judges it on the
    serving version's user features, so a new version moves users whose features changed in or
    out of the experiment (and between experiments that share users). Counted after the
    commit: two versions' features are read, which must not hold the store's write lock."""
    if not targets:
        return []
    # Both versions' features are read whole: about 20 s for a million users (docs/ADMIN.md).
    message(
        f"counting the known users this version moves in or out of {len(targets)} running "
        "experiment(s) with a condition target..."
    )
    try:
        old = load_shop_facts(Path(before)).user_features if before else {}
        new = load_shop_facts(Path(after)).user_features
    except ArtifactError:
        return []  # register refused unreadable ones; a folder changed since: nothing to count
    notes = []
    for key, segment, raw in targets:
        try:
            condition = parse_condition(raw)
        except ConditionError:
            continue
        moved = sum(
            evaluate(condition, resolve_features(old.get(u), {}))
            != evaluate(condition, resolve_features(new.get(u), {}))
            for u in old.keys() | new.keys()
        )
        if moved:
            notes.append(
                f"note: running experiment {key!r} targets segment {segment!r}, judged on the "
                f"serving version's user features: {moved:,} known user(s) move in or out of it "
                "with this version, so its arms mix users measured under both"
            )
    return notes


def warn_if_served_elsewhere(path: str) -> None:
    """Say so when the model store's CURRENT names another version than the registry's active
    one at path: discountd serves what CURRENT names, and `discount-train fit` moves it."""
    version_dir = Path(path)
    pointer = version_dir.parent / CURRENT
    named = _named(version_dir.parent)
    if named is not None and named != version_dir.name:
        message(
            f"warning: {pointer} names {named!r}, not the registry's active version "
            f"{version_dir.name!r}, and discountd serves what it names (`discount-train fit` "
            f"makes a version CURRENT unless given --no-current); `discountctl models register "
            f"{version_dir.parent / named}` and `discountctl models promote {named}` bring the "
            "registry in line"
        )


def _serve(path: str, left: str | None) -> None:
    """Point the model store's CURRENT at the version folder: discountd follows CURRENT. left is
    the version that was active: a CURRENT in another model store keeps naming it.

    Done after the registry commits, so a refused change never moves what servers load.
    """
    version_dir = Path(path)
    try:
        set_current(version_dir.parent, version_dir.name)
    except OSError as e:
        raise click.ClickException(
            f"the registry now says {version_dir.name!r} is active, but "
            f"{version_dir.parent}/CURRENT could not be written ({e.strerror}); "
            "fix the permissions and promote it again"
        ) from None
    old = Path(left) if left is not None else None
    if old is not None and old.parent != version_dir.parent and _named(old.parent) == old.name:
        message(
            f"note: {old.parent / CURRENT} still names {old.name!r}, which servers started with "
            f"--model-dir {old.parent} keep serving: CURRENT names a folder beside it, so keep "
            "the versions you promote in one model store"
        )


def _named(store: Path) -> str | None:
    """The version the model store's CURRENT names, if it names one there."""
    try:
        return current_version_dir(store).name
    except (ArtifactError, OSError):
        return None
