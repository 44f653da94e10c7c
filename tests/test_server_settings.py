"""discountd settings: flags beat DISCOUNT_* variables, which beat defaults; every bad value is
reported in one error."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.main import main
from server.settings import SettingsError, resolve
from server.versions import LARGE_CATALOG, ort_threads_for

KEY = {"DISCOUNT_OFFER_KEY": "k" * 40}


def test_defaults_apply_when_nothing_is_given(tmp_path: Path) -> None:
    settings = resolve({"model_dir": str(tmp_path)}, env=KEY, insecure=True)
    assert (settings.model_dir, settings.device, settings.host, settings.port) == (
        tmp_path,
        "auto",
        "0.0.0.0",
        50051,
    )
    assert (settings.poll_interval, settings.grace) == (2.0, 10.0)


def test_environment_fills_in_and_flags_win(tmp_path: Path) -> None:
    env = {
        **KEY,
        "DISCOUNT_MODEL_DIR": str(tmp_path),
        "DISCOUNT_DEVICE": "CPU",
        "DISCOUNT_GRPC_PORT": "6000",
        "DISCOUNT_POLL_INTERVAL": "0",
    }
    from_env = resolve({}, env=env, insecure=True)
    assert (from_env.model_dir, from_env.device, from_env.port, from_env.poll_interval) == (
        tmp_path,
        "cpu",
        6000,
        0.0,
    )
    assert from_env.max_connection_age == 300.0  # the default
    aged = resolve({}, env={**env, "DISCOUNT_MAX_CONNECTION_AGE": "60"}, insecure=True)
    assert aged.max_connection_age == 60.0
    flagged = resolve(
        {"port": "7000", "device": "cuda", "grace": "1.5", "max_connection_age": "0"},
        env=env,
        insecure=True,
    )
    assert (flagged.port, flagged.device, flagged.grace) == (7000, "cuda", 1.5)
    assert flagged.max_connection_age == 0.0


def test_every_bad_setting_is_reported_at_once(tmp_path: Path) -> None:
    flags = {
        "model_dir": str(tmp_path / "nope"),
        "device": "tpu",
        "port": "70000",
        "poll_interval": "-1",
        "grace": "soon",
        "host": "",
        "ort_threads": "-2",
        "max_connection_age": "1e9",
    }
    with pytest.raises(SettingsError) as raised:
        resolve(flags, env=KEY, insecure=True)
    message = str(raised.value)
    for expected in (
        "--model-dir / DISCOUNT_MODEL_DIR",
        "--device / DISCOUNT_DEVICE: 'tpu'",
        "--port / DISCOUNT_GRPC_PORT: '70000'",
        "--poll-interval / DISCOUNT_POLL_INTERVAL: '-1'",
        "--grace / DISCOUNT_SHUTDOWN_GRACE: 'soon'",
        "--host / DISCOUNT_GRPC_HOST must not be empty",
        "--ort-threads / DISCOUNT_ORT_THREADS: '-2'",
        "--max-connection-age / DISCOUNT_MAX_CONNECTION_AGE: '1e9' is not 0 (for ever) or 1 to",
    ):
        assert expected in message


def test_a_store_url_that_is_not_utf8_is_refused_without_its_password(tmp_path: Path) -> None:
    url = "postgresql+psycopg://admin:Tr\udce9sSecret@db.internal/shop"  # Latin-1 é, as argv
    with pytest.raises(SettingsError) as raised:
        resolve({"model_dir": str(tmp_path), "db_url": url}, env=KEY, insecure=True)
    message = str(raised.value)
    assert "--db-url / DISCOUNT_DB_URL" in message and "is not valid UTF-8 text" in message
    assert "Secret" not in message and "admin:***@db.internal" in message


def test_model_dir_is_required() -> None:
    with pytest.raises(SettingsError, match="--model-dir / DISCOUNT_MODEL_DIR is required"):
        resolve({}, env=KEY, insecure=True)


# Arbitrary text seldom spells a number: numbers in and around the port range, and text made of
# the characters numbers are written with, are drawn too.
port_texts = (
    st.text(max_size=8)
    | st.integers(-70_000, 140_000).map(str)
    | st.text(alphabet="0123456789 +-_.e", max_size=7)
)


@given(port=port_texts)
def test_any_port_text_is_accepted_only_as_a_port_number(
    tmp_path_factory: pytest.TempPathFactory, port: str
) -> None:
    model_dir = str(tmp_path_factory.getbasetemp())
    is_port = port.isascii() and port.isdigit() and int(port) <= 65535
    try:
        settings = resolve({"model_dir": model_dir, "port": port}, env=KEY, insecure=True)
    except SettingsError as e:
        assert f"--port / DISCOUNT_GRPC_PORT: {port!r} is not a port number" in str(e)
        assert not is_port, f"the port {port!r} was refused"
        return
    assert 0 <= settings.port <= 65535 and int(port) == settings.port


@given(cores=st.integers(1, 256), workers=st.integers(1, 64), n_items=st.integers(1, 10_000_000))
def test_each_worker_leaves_its_event_loop_a_core_unless_the_catalog_is_large(
    cores: int, workers: int, n_items: int
) -> None:
    threads = ort_threads_for(cores, workers, n_items)
    share = max(1, cores // workers)
    assert 1 <= threads <= share
    if n_items < LARGE_CATALOG:
        assert threads == 1 or (threads + 1) * workers <= cores
    else:
        assert threads == share
    assert ort_threads_for(16, 1, 100_000) == 15 and ort_threads_for(16, 2, 100_000) == 7
    assert ort_threads_for(2, 1, 100_000) == 1 and ort_threads_for(2, 1, 1_000_000) == 2


def test_ort_threads_given_win_over_the_automatic_choice(tmp_path: Path) -> None:
    automatic = resolve({"model_dir": str(tmp_path)}, env=KEY, insecure=True)
    assert automatic.ort_threads == 0  # chosen for each version as it loads
    given_env = resolve({"model_dir": str(tmp_path)}, env={**KEY, "DISCOUNT_ORT_THREADS": "3"},
                        insecure=True)  # fmt: skip
    assert given_env.ort_threads == 3
    assert resolve({"model_dir": str(tmp_path), "ort_threads": "2"}, env=KEY,
                   insecure=True).ort_threads == 2  # fmt: skip


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_seconds_that_are_not_finite_are_refused(tmp_path: Path, text: str) -> None:
    # A nan grace drained for "nans"; a nan poll interval passed every range check and then
    # never polled again.
    flags = {
        "model_dir": str(tmp_path),
        "poll_interval": text,
        "grace": text,
        "rules_poll_interval": text,
        "offer_ttl": text,
    }
    with pytest.raises(SettingsError) as raised:
        resolve(flags, env=KEY, insecure=True)
    for name in ("POLL_INTERVAL", "SHUTDOWN_GRACE", "RULES_POLL_INTERVAL", "OFFER_TTL"):
        assert f"DISCOUNT_{name}: {text!r}" in str(raised.value)


def test_numbers_with_underscores_are_refused(tmp_path: Path) -> None:
    flags = {"model_dir": str(tmp_path), "port": "1_0000", "grace": "1_0"}
    with pytest.raises(SettingsError) as raised:
        resolve(flags, env=KEY, insecure=True)
    assert "DISCOUNT_GRPC_PORT: '1_0000'" in str(raised.value)
    assert "DISCOUNT_SHUTDOWN_GRACE: '1_0'" in str(raised.value)


def test_each_workers_metrics_port_must_be_a_port(tmp_path: Path) -> None:
    flags = {"model_dir": str(tmp_path), "metrics_port": "65535", "workers": "2"}
    with pytest.raises(SettingsError, match="65535 \\+ 2 workers passes port 65535"):
        resolve(flags, env=KEY, insecure=True)
    assert resolve({**flags, "workers": "1"}, env=KEY, insecure=True).metrics_port == 65535
    assert resolve({**flags, "metrics_port": "0"}, env=KEY, insecure=True).metrics_port == 0


def test_tls_files_with_insecure_say_both_ways_out(tmp_path: Path) -> None:
    flags = {"model_dir": str(tmp_path), "tls_cert": str(tmp_path / "tls.crt")}
    with pytest.raises(SettingsError) as raised:
        resolve(flags, env=KEY, insecure=True)
    assert "leave out the --tls-* settings" in str(raised.value)
    assert "or drop --insecure" in str(raised.value)


def test_the_offer_spill_dir_is_made_at_start_and_must_take_files(tmp_path: Path) -> None:
    spill = tmp_path / "state" / "spill"
    env = {**KEY, "DISCOUNT_OFFER_SPILL_DIR": str(spill)}
    settings = resolve({"model_dir": str(tmp_path)}, env=env, insecure=True)
    assert settings.offer_spill_dir == spill and spill.is_dir()
    assert resolve({"model_dir": str(tmp_path)}, env=KEY, insecure=True).offer_spill_dir is None
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(SettingsError) as e:
        flags = {"model_dir": str(tmp_path), "offer_spill_dir": str(a_file / "spill")}
        resolve(flags, env=KEY, insecure=True)
    assert f"--offer-spill-dir / DISCOUNT_OFFER_SPILL_DIR: {a_file / 'spill'} cannot take" in str(
        e.value
    )


def test_help_names_what_each_option_takes() -> None:
    """resolve() parses the values (to report every bad one at once), so click types them all as
    text: without a metavar the help would show `--port TEXT`, `--device TEXT`."""
    unnamed = [
        p.opts[0]
        for p in main.params
        if isinstance(p, click.Option) and not p.is_flag and p.metavar is None
    ]
    assert unnamed == []
