"""Signed offer tokens: a checkout service can prove an offer was issued, unchanged, and is live.

A token is ``PAYLOAD.MAC``, both base64url without padding. PAYLOAD is the UTF-8 JSON array
``["v1", offer_id, user_id, item_id, final_price, expires_at]`` (price as a decimal string,
expiry as Unix seconds), so the token carries everything needed to check it; MAC is
HMAC-SHA256 of the PAYLOAD text under the offer key. Tokens are signed, not encrypted: the
fields are readable by whoever holds the token, which is fine for ids and a price the user sees.

Key rotation: sign with the current key, accept the current and any previously accepted keys
until the tokens they signed have expired.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum

KEY_ENV = "DISCOUNT_OFFER_KEY"
# Comma-separated keys that verify (never sign) tokens, for rotation.
PREVIOUS_KEYS_ENV = "DISCOUNT_OFFER_PREVIOUS_KEYS"
MIN_KEY_BYTES = 32
MAX_PRICE = Decimal("9999999999.99")
_VERSION = "v1"
_HOW_TO_MAKE_A_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(48))'"


class OfferKeyError(Exception):
    """The offer signing key is missing or too weak; the message says how to fix it."""


class TokenStatus(StrEnum):
    VALID = "valid"
    # Not signed by an accepted key, or not a token at all: never trust its fields.
    TAMPERED = "tampered"
    EXPIRED = "expired"


@dataclass(frozen=True)
class OfferKeys:
    """The key that signs new tokens and the older keys still accepted when verifying."""

    # Out of repr: a Settings or a traceback's locals printed in a log must not show a key.
    current: bytes = field(repr=False)
    previous: tuple[bytes, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        for n, key in enumerate((self.current, *self.previous)):
            what = KEY_ENV if n == 0 else f"{PREVIOUS_KEYS_ENV} entry {n}"
            _check_key(key, what)

    @property
    def accepted(self) -> tuple[bytes, ...]:
        return (self.current, *self.previous)


@dataclass(frozen=True)
class OfferClaims:
    """What a token says about its offer."""

    offer_id: str
    user_id: str
    item_id: str
    final_price: Decimal
    expires_at: datetime


@dataclass(frozen=True)
class Verification:
    """The verdict on a token; ``claims`` is set when the signature is good (valid or expired)."""

    status: TokenStatus
    claims: OfferClaims | None = None


def _check_key(key: bytes, what: str) -> None:
    if len(key) < MIN_KEY_BYTES:
        raise OfferKeyError(
            f"{what} is {len(key)} bytes; an offer key must be at least {MIN_KEY_BYTES} bytes "
            f"of secret (make one with: {_HOW_TO_MAKE_A_KEY})"
        )


def load_offer_keys(environ: Mapping[str, str] = os.environ) -> OfferKeys:
    """Read the signing key from DISCOUNT_OFFER_KEY and older ones from
    DISCOUNT_OFFER_PREVIOUS_KEYS; OfferKeyError (never showing a key) when one is unusable."""
    current = environ.get(KEY_ENV, "")
    if not current:
        raise OfferKeyError(
            f"{KEY_ENV} is not set; set it to a secret of at least {MIN_KEY_BYTES} bytes "
            f"(make one with: {_HOW_TO_MAKE_A_KEY})"
        )
    raw_previous = environ.get(PREVIOUS_KEYS_ENV, "")
    entries = raw_previous.split(",") if raw_previous else []
    # "K1, K2" must not leave K2 verifying only as " K2", which passes the length check and
    # fails every token K2 signed; but a key that signed with a space or line break around it
    # (the current key is taken as it is) verifies as it was too, after the stripped ones so
    # that an error's entry number is the one the operator wrote.
    previous = [k.strip() for k in entries] + [k for k in entries if k != k.strip()]
    return OfferKeys(current.encode(), tuple(k.encode() for k in previous))


# One encoder for every token: json.dumps builds a new one per call when given options.
_compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest())


def sign(
    offer_id: str,
    user_id: str,
    item_id: str,
    final_price: Decimal,
    expires_at: datetime,
    key: bytes,
) -> str:
    """A token for one offer; ``expires_at`` must be timezone-aware (kept to the second)."""
    return sign_all(user_id, expires_at, key, [(offer_id, item_id, final_price)])[0]


def sign_all(
    user_id: str,
    expires_at: datetime,
    key: bytes,
    offers: Sequence[tuple[str, str, Decimal]],
) -> list[str]:
    """Tokens for one user's (offer_id, item_id, final_price) offers with one expiry, as sign
    makes them one by one: the checks, the key's HMAC state and the fields the offers share
    are prepared once (a GetOffers answer signs up to a hundred)."""
    _check_key(key, "the signing key")
    if expires_at.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware, e.g. datetime.now(UTC)")
    keyed = hmac.new(key, digestmod=hashlib.sha256)
    # The JSON array of sign's fields, spelled as _compact_json spells it.
    user = _compact_json(user_id)
    expires = int(expires_at.timestamp())
    tokens = []
    for offer_id, item_id, final_price in offers:
        if not final_price.is_finite():
            raise ValueError(f"final_price must be a finite amount, got {final_price}")
        fields = (
            f'["{_VERSION}",{_compact_json(offer_id)},{user},{_compact_json(item_id)},'
            f'"{final_price}",{expires}]'
        )
        payload = _b64(fields.encode())
        mac = keyed.copy()
        mac.update(payload.encode("ascii"))
        tokens.append(f"{payload}.{_b64(mac.digest())}")
    return tokens


def _claims(payload: str) -> OfferClaims | None:
    try:
        fields = json.loads(_unb64(payload))
        version, offer_id, user_id, item_id, price, expires = fields
        if version != _VERSION or not isinstance(expires, int):
            return None
        if not all(isinstance(f, str) for f in (offer_id, user_id, item_id, price)):
            return None
        amount = Decimal(price)
        # No issued offer has another price (the offers table's is NUMERIC(12, 2)): a token that
        # says so was signed by someone else holding the key, and its cents would not fit.
        if not (amount.is_finite() and 0 <= amount <= MAX_PRICE):
            return None
        return OfferClaims(offer_id, user_id, item_id, amount, datetime.fromtimestamp(expires, UTC))
    except (ValueError, TypeError, InvalidOperation, binascii.Error, OverflowError, OSError):
        return None


def verify(token: str, keys: OfferKeys, now: datetime) -> Verification:
    """Check a token's signature against every accepted key, then its expiry at ``now``."""
    payload, dot, mac = token.partition(".")
    if not dot or not payload.isascii() or not mac.isascii():
        return Verification(TokenStatus.TAMPERED)
    # Comparing the base64 text, not decoded bytes, so that no two spellings of a MAC pass.
    signed = any(
        hmac.compare_digest(_mac(key, payload).encode(), mac.encode()) for key in keys.accepted
    )
    claims = _claims(payload) if signed else None
    if claims is None:
        return Verification(TokenStatus.TAMPERED)
    if now >= claims.expires_at:
        return Verification(TokenStatus.EXPIRED, claims)
    return Verification(TokenStatus.VALID, claims)
