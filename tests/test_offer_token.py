"""Offer tokens: round trip, any tampering detected, expiry, key rotation, weak keys refused."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.offer_token import (
    MAX_PRICE,
    OfferClaims,
    OfferKeyError,
    OfferKeys,
    TokenStatus,
    load_offer_keys,
    sign,
    sign_all,
    verify,
)

KEY = b"k" * 32
OLD_KEY = b"o" * 40
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=15)

ids = st.text(max_size=12)
prices = st.decimals(min_value=0, max_value=10**9, places=2)
expiries = st.integers(min_value=1, max_value=10**7).map(lambda s: NOW + timedelta(seconds=s))


def _token(**changes: object) -> str:
    fields: dict[str, object] = {
        "offer_id": "off-1",
        "user_id": "u-17850",
        "item_id": "85123A",
        "final_price": Decimal("2.55"),
        "expires_at": LATER,
        "key": KEY,
    }
    fields.update(changes)
    return sign(**fields)  # type: ignore[arg-type]


@given(ids, ids, ids, prices, expiries)
def test_a_signed_token_verifies_with_its_fields(
    offer_id: str, user_id: str, item_id: str, price: Decimal, expires_at: datetime
) -> None:
    token = sign(offer_id, user_id, item_id, price, expires_at, KEY)
    result = verify(token, OfferKeys(KEY), NOW)
    assert result.status is TokenStatus.VALID
    assert result.claims == OfferClaims(offer_id, user_id, item_id, price, expires_at)
    assert token.isascii() and " " not in token


@given(ids, expiries, st.lists(st.tuples(ids, ids, prices), max_size=5))
def test_signing_an_answer_at_once_gives_each_offer_the_token_sign_gives_it(
    user_id: str, expires_at: datetime, offers: list[tuple[str, str, Decimal]]
) -> None:
    tokens = sign_all(user_id, expires_at, KEY, offers)
    assert tokens == [sign(o, user_id, i, p, expires_at, KEY) for o, i, p in offers]
    for token, (offer_id, item_id, price) in zip(tokens, offers, strict=True):
        claims = verify(token, OfferKeys(KEY), NOW).claims
        assert claims == OfferClaims(offer_id, user_id, item_id, price, expires_at)


def test_the_payload_is_the_documented_json_array() -> None:
    payload, _ = _token(user_id='u "ü"').split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert fields == ["v1", "off-1", 'u "ü"', "85123A", "2.55", int(LATER.timestamp())]


@given(st.data())
def test_changing_any_character_of_a_token_is_tampering(data: st.DataObject) -> None:
    token = _token()
    position = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=é"
    char = data.draw(st.sampled_from(alphabet).filter(lambda c: c != token[position]))
    forged = token[:position] + char + token[position + 1 :]
    assert verify(forged, OfferKeys(KEY), NOW).status is TokenStatus.TAMPERED


@pytest.mark.parametrize(
    "change",
    [
        {"offer_id": "off-2"},
        {"user_id": "u-1"},
        {"item_id": "85123B"},
        {"final_price": Decimal("0.01")},
        {"expires_at": LATER + timedelta(days=365)},
    ],
)
def test_a_payload_with_any_field_changed_fails_the_original_signature(
    change: dict[str, object],
) -> None:
    _, mac = _token().split(".")
    # The attacker's payload is well formed; only the key is missing.
    forged_payload, _ = _token(key=b"x" * 32, **change).split(".")
    assert verify(f"{forged_payload}.{mac}", OfferKeys(KEY), NOW).status is TokenStatus.TAMPERED


@pytest.mark.parametrize("garbage", ["", ".", "abc", "abc.def", "..", "é.é", _token() + "."])
def test_garbage_is_tampered_not_an_error(garbage: str) -> None:
    assert verify(garbage, OfferKeys(KEY), NOW).status is TokenStatus.TAMPERED


@pytest.mark.parametrize("price", ["-5", "1E+30", "10000000000.00", "1e400", "-0.01"])
def test_a_price_no_offer_can_have_is_tampered_even_under_an_accepted_key(price: str) -> None:
    """Only someone else holding the key signs these (the public demo key, a leaked one); the
    server's VerifyOffer answered UNKNOWN for a price whose cents overflow int64."""
    token = _token(final_price=Decimal(price))
    assert verify(token, OfferKeys(KEY), NOW) == verify("forged", OfferKeys(KEY), NOW)


def test_the_largest_price_the_store_holds_verifies() -> None:
    token = _token(final_price=MAX_PRICE)
    result = verify(token, OfferKeys(KEY), NOW)
    assert result.status is TokenStatus.VALID and result.claims is not None
    assert result.claims.final_price == MAX_PRICE


def test_expiry_is_reported_only_for_genuine_tokens() -> None:
    token = _token()
    assert verify(token, OfferKeys(KEY), LATER - timedelta(seconds=1)).status is TokenStatus.VALID
    expired = verify(token, OfferKeys(KEY), LATER)
    assert expired.status is TokenStatus.EXPIRED
    assert expired.claims is not None and expired.claims.offer_id == "off-1"
    forged = verify(_token(key=b"x" * 32), OfferKeys(KEY), LATER)
    assert (forged.status, forged.claims) == (TokenStatus.TAMPERED, None)


def test_rotation_accepts_previous_keys_until_they_are_dropped() -> None:
    old_token = _token(key=OLD_KEY)
    rotated = OfferKeys(KEY, (OLD_KEY,))
    assert verify(old_token, rotated, NOW).status is TokenStatus.VALID
    assert verify(_token(), rotated, NOW).status is TokenStatus.VALID
    assert verify(old_token, OfferKeys(KEY), NOW).status is TokenStatus.TAMPERED


def test_keys_load_from_the_environment() -> None:
    keys = load_offer_keys(
        {"DISCOUNT_OFFER_KEY": "c" * 32, "DISCOUNT_OFFER_PREVIOUS_KEYS": f"{'a' * 32},{'b' * 33}"}
    )
    assert keys == OfferKeys(b"c" * 32, (b"a" * 32, b"b" * 33))
    # "K1, K2" verifies K2's tokens; a current key with a line break, moved into the list,
    # still verifies the tokens it signed.
    previous = f"{'a' * 32}, {'b' * 33}"
    spaced = {"DISCOUNT_OFFER_KEY": "c" * 32, "DISCOUNT_OFFER_PREVIOUS_KEYS": previous}
    assert (b"b" * 33) in load_offer_keys(spaced).accepted
    token = sign("o1", "u1", "i1", Decimal("9.00"), LATER, b"k" * 40 + b"\n")
    rotated = {"DISCOUNT_OFFER_KEY": "n" * 32, "DISCOUNT_OFFER_PREVIOUS_KEYS": "k" * 40 + "\n"}
    assert verify(token, load_offer_keys(rotated), NOW).status is TokenStatus.VALID
    assert load_offer_keys({"DISCOUNT_OFFER_KEY": "é" * 16}).previous == ()  # 32 UTF-8 bytes


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "DISCOUNT_OFFER_KEY is not set; set it to a secret of at least 32 bytes"),
        ({"DISCOUNT_OFFER_KEY": ""}, "DISCOUNT_OFFER_KEY is not set"),
        ({"DISCOUNT_OFFER_KEY": "s3cret"}, "DISCOUNT_OFFER_KEY is 6 bytes; .* at least 32 bytes"),
        (
            {"DISCOUNT_OFFER_KEY": "c" * 32, "DISCOUNT_OFFER_PREVIOUS_KEYS": "a" * 32 + ",short"},
            "DISCOUNT_OFFER_PREVIOUS_KEYS entry 2 is 5 bytes",
        ),
    ],
)
def test_missing_or_short_keys_are_refused_without_showing_them(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(OfferKeyError, match=message) as error:
        load_offer_keys(environ)
    assert "secrets.token_urlsafe" in str(error.value)
    assert all(v not in str(error.value) for v in environ.values() if v)


def test_signing_refuses_a_short_key_and_a_naive_expiry() -> None:
    with pytest.raises(OfferKeyError, match="signing key is 31 bytes"):
        _token(key=b"k" * 31)
    with pytest.raises(ValueError, match="timezone-aware"):
        _token(expires_at=datetime(2026, 11, 28, 12, 0))
