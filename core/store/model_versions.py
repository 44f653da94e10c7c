"""Model versions: register a verified artifact, promote one to active, roll back."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.artifact import (
    CURRENT,
    MANIFEST,
    ArtifactError,
    Manifest,
    current_version_dir,
    load_manifest,
    sha256_file,
)
from core.shop import load_shop_facts
from core.store import audit
from core.store.errors import Conflict, InvalidInput, NotFound
from core.store.tables import ModelVersion, utcnow


class ModelVersions:
    """Repository: takes a Session and never commits; the caller owns the transaction."""

    def __init__(self, session: Session, actor: str = "system") -> None:
        self.session = session
        self.actor = actor

    def get(self, version: str, for_update: bool = False) -> ModelVersion:
        """for_update: read afresh and lock to the end of the transaction (PostgreSQL), so a
        promote or rollback of it at the same moment waits for this one and then sees it."""
        query = select(ModelVersion).where(ModelVersion.version == version)
        if for_update:
            query = query.with_for_update().execution_options(populate_existing=True)
        found = self.session.scalar(query)
        if found is None:
            raise NotFound(
                f"no model version {version!r} is registered; `discountctl models register DIR` "
                "registers the version folder DIR, `discountctl models list` shows those registered"
            )
        return found

    def list_all(self) -> list[ModelVersion]:
        return list(
            self.session.scalars(select(ModelVersion).order_by(ModelVersion.registered_at.desc()))
        )

    def active(self) -> ModelVersion | None:
        return self.session.scalar(select(ModelVersion).where(ModelVersion.status == "active"))

    def register(self, directory: Path) -> ModelVersion:
        """Verify every file against the manifest's sha256 and record the version as staged."""
        path = directory.resolve()
        if not (path / MANIFEST).exists() and (path / CURRENT).is_file():
            # What `discount-train fit --out` was given: the store, not the version in it.
            try:
                example = current_version_dir(path)
            except ArtifactError:
                example = path / "VERSION"
            raise InvalidInput(
                f"not a valid model version: {path} is a model store (it has {CURRENT}); "
                f"give a version folder in it, e.g. {example}"
            )
        manifest = _verified(path)
        existing = self.session.scalar(
            select(ModelVersion).where(ModelVersion.version == manifest.version)
        )
        if existing is not None:
            raise Conflict(
                f"model version {manifest.version!r} is already registered (from {existing.path})"
            )
        model = ModelVersion(
            version=manifest.version,
            path=str(path),
            manifest_sha256=sha256_file(path / MANIFEST),
            metrics=manifest.metrics,
            status="staged",
        )
        self.session.add(model)
        self.session.flush()
        audit.record(
            self.session,
            self.actor,
            "register",
            "model",
            model.id,
            model.version,
            None,
            model.to_dict(),
        )
        return model

    def promote(self, version: str) -> ModelVersion:
        """Make a version active; the active one before it is retired."""
        # Locked: a promote of the same version at the same moment finds it active here,
        # rather than promoting it again (a second audit entry, a later activated_at).
        model = self.get(version, for_update=True)
        if model.status == "active":
            raise InvalidInput(f"model version {version!r} is already active")
        _unchanged(model)
        return self._activate(model, "promote", rolled_back=None)

    def rollback(self, expected: str | None = None) -> ModelVersion:
        """Retire the active version and reactivate the one active before it; with expected,
        only while the active version is still that one (Conflict otherwise)."""
        if expected is not None:
            # Locked first: a rollback from it at the same moment waits, then finds another
            # version active, rather than rolling back from it a second time.
            self.get(expected, for_update=True)
        current = self.active()
        if current is None:
            raise InvalidInput("no active model version to roll back from")
        if expected is not None and current.version != expected:
            raise Conflict(
                f"model version {current.version!r} became active since rollback from "
                f"{expected!r} was asked for; nothing was changed: run rollback again to roll "
                f"back from {current.version!r}"
            )
        previous = self.session.scalar(
            select(ModelVersion)
            .where(
                ModelVersion.status == "retired",
                ModelVersion.activated_at.is_not(None),
                ModelVersion.rolled_back_at.is_(None),
            )
            .order_by(ModelVersion.activated_at.desc())
            .limit(1)
        )
        if previous is None:
            # Versions rolled back from do not count: rollback never returns to one.
            raise InvalidInput(
                f"nothing to roll back to: no version but {current.version!r} has been active, "
                "except ones rolled back from; `discountctl models promote VERSION` picks one"
            )
        try:
            _unchanged(previous)
        except InvalidInput as e:
            raise InvalidInput(
                f"cannot roll back to {previous.version!r}: {e}; "
                "`discountctl models promote VERSION` picks another"
            ) from None
        return self._activate(previous, "rollback", rolled_back=current)

    def _activate(
        self, model: ModelVersion, action: str, rolled_back: ModelVersion | None
    ) -> ModelVersion:
        before = model.to_dict()
        now = utcnow()
        current = self.active()
        if current is not None:
            current.status = "retired"
            if rolled_back is not None:
                current.rolled_back_at = now
            # Retire first: at no point may two versions be active.
            self.session.flush()
        model.status = "active"
        model.activated_at = now
        model.rolled_back_at = None
        try:
            self.session.flush()
        except IntegrityError:  # the one-active index: another promote or rollback won
            raise Conflict(
                "another model version was activated at the same time; see `discountctl "
                "models list` and try again"
            ) from None
        audit.record(
            self.session,
            self.actor,
            action,
            "model",
            model.id,
            model.version,
            before,
            model.to_dict(),
        )
        return model


def _unchanged(model: ModelVersion) -> None:
    """The files may have changed since registration; never activate what was not verified."""
    _verified(Path(model.path))
    if sha256_file(Path(model.path) / MANIFEST) != model.manifest_sha256:
        raise InvalidInput(
            f"{model.path}: manifest changed since {model.version!r} was registered; "
            "register the new version instead"
        )


def _verified(path: Path) -> Manifest:
    """The manifest of a version whose files match it, and whose catalog discountd and the
    report can read (InvalidInput otherwise)."""
    try:
        manifest = load_manifest(path, verify=True)
        load_shop_facts(path)
    except ArtifactError as e:
        raise InvalidInput(f"not a valid model version: {e}") from None
    return manifest
