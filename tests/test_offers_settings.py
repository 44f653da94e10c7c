"""discountd's offer settings and start-up checks: signing key, store schema, reachability."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from core.store.errors import SchemaOutOfDate, StoreUnavailable
from server.app import create_server
from server.main import main
from server.settings import (
    DEMO_OFFER_KEY,
    Settings,
    SettingsError,
    insecure_demo_key_in_use,
    resolve,
)

GOOD_KEY = "k" * 32


def test_offer_key_is_required_and_checked(tmp_path: Path) -> None:
    flags = {"model_dir": str(tmp_path)}
    with pytest.raises(SettingsError, match=r"DISCOUNT_OFFER_KEY is not set.*--insecure-demo-key"):
        resolve(flags, env={}, insecure=True)
    with pytest.raises(SettingsError, match="at least 32 bytes"):
        resolve(flags, env={"DISCOUNT_OFFER_KEY": "short"}, insecure=True)
    settings = resolve(
        flags, env={"DISCOUNT_OFFER_KEY": GOOD_KEY, "DISCOUNT_OFFER_TTL": "60"}, insecure=True
    )
    assert settings.offer_keys is not None and settings.offer_keys.current == GOOD_KEY.encode()
    assert settings.offer_ttl == 60 and not insecure_demo_key_in_use(settings)
    assert GOOD_KEY not in repr(settings)
    assert insecure_demo_key_in_use(resolve(flags, env={}, insecure_demo_key=True, insecure=True))
    # Taken from a demo into a rotation, it would still verify whatever anyone signs with it.
    for env in (
        {"DISCOUNT_OFFER_KEY": DEMO_OFFER_KEY.decode()},
        {"DISCOUNT_OFFER_KEY": GOOD_KEY, "DISCOUNT_OFFER_PREVIOUS_KEYS": DEMO_OFFER_KEY.decode()},
    ):
        with pytest.raises(SettingsError, match="the offer keys hold the public demo key"):
            resolve(flags, env=env, insecure=True)
    with pytest.raises(SettingsError) as e:
        resolve({**flags, "offer_ttl": "0", "rules_poll_interval": "-1"}, env={}, insecure=True)
    for fragment in ("--offer-ttl", "--rules-poll-interval", "DISCOUNT_OFFER_KEY"):
        assert fragment in str(e.value)


def test_discountd_without_a_key_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--model-dir", str(tmp_path)], env={"DISCOUNT_OFFER_KEY": ""}
    )
    assert result.exit_code == 2
    assert "DISCOUNT_OFFER_KEY is not set" in result.output and "Traceback" not in result.output


def settings(model_store: Path, db_url: str) -> Settings:
    return resolve(
        {"model_dir": str(model_store), "db_url": db_url, "port": "0", "host": "127.0.0.1"},
        env={},
        insecure_demo_key=True,
        insecure=True,
    )


def test_a_store_without_the_schema_is_refused(model_store: Path, tmp_path: Path) -> None:
    with pytest.raises(SchemaOutOfDate, match="discountctl db upgrade"):
        create_server(settings(model_store, f"sqlite:///{tmp_path / 'empty.db'}"))


def test_an_unreachable_store_is_refused_with_the_password_masked(model_store: Path) -> None:
    url = "postgresql+psycopg://admin:s3cret@127.0.0.1:1/discount"
    with pytest.raises(StoreUnavailable) as e:
        create_server(settings(model_store, url))
    assert "s3cret" not in str(e.value) and "admin:***@127.0.0.1:1" in str(e.value)
