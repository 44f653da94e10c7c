"""Calling services and their bearer tokens.

A token is 256 random bits, shown once at creation; the store keeps only its SHA-256. A fast
unsalted hash is enough here because the input is high-entropy random, not a password: there is
no dictionary to try and 2^256 guesses to brute-force, so bcrypt/scrypt would only cost CPU on
every call. The digest is also the lookup key, so the server checks a token with one dict probe.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.store import audit, validate
from core.store.errors import Conflict, NotFound
from core.store.tables import Client, utcnow

TOKEN_PREFIX = "dct_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def active_digests(session: Session) -> dict[str, str]:
    """token SHA-256 -> client name, for every client not revoked."""
    rows = session.execute(
        select(Client.token_sha256, Client.name).where(Client.revoked_at.is_(None))
    )
    return {token_sha256: name for token_sha256, name in rows}


class Clients:
    """Repository: takes a Session and never commits; the caller owns the transaction."""

    def __init__(self, session: Session, actor: str = "system") -> None:
        self.session = session
        self.actor = actor

    def get(self, name: str) -> Client:
        found = self.session.scalar(select(Client).where(Client.name == name))
        if found is None:
            raise NotFound(f"no client {name!r}; see `discountctl clients list`")
        return found

    def list_all(self) -> list[Client]:
        return list(self.session.scalars(select(Client).order_by(Client.name)))

    def create(self, name: str) -> tuple[Client, str]:
        """The new client and its token: the only time the token exists outside the caller."""
        validate.name("client", name)
        if self.session.scalar(select(Client.id).where(Client.name == name)) is not None:
            raise Conflict(
                f"client {name!r} already exists; pick another name (to rotate a token, create "
                f"a new client, deploy its token, then revoke {name!r})"
            )
        token = new_token()
        client = Client(name=name, token_sha256=digest(token))
        self.session.add(client)
        self.session.flush()
        audit.record(
            self.session, self.actor, "create", "client", client.id, name, None, client.to_dict()
        )
        return client, token

    def revoke(self, name: str) -> Client:
        # Read afresh and locked: a revoke at the same moment waits and then finds this one's
        # (it revoked again, moving revoked_at and writing a second audit entry).
        self.session.scalar(
            select(Client)
            .where(Client.name == name)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        client = self.get(name)
        if client.revoked_at is not None:
            raise Conflict(
                f"client {name!r} was already revoked at {client.revoked_at:%Y-%m-%d %H:%M:%S}Z"
            )
        before = client.to_dict()
        client.revoked_at = utcnow()
        self.session.flush()
        audit.record(
            self.session, self.actor, "revoke", "client", client.id, name, before, client.to_dict()
        )
        return client
