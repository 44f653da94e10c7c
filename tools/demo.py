"""`make demo`: a shop's purchase history to a measured discount experiment, on this machine.

Builds a small synthetic shop (or reads Online Retail), trains and exports a model, trains a
response model on a randomized discount experiment logged in the market simulator, migrates a
fresh SQLite store, seeds segments, a tiered_topk and an optimal rule and an experiment
(control: no discount; tiered: the classic rule; optimal: the response model's choice), starts
discountd as its own process, asks it for recommendations as a storefront would, replays
simulated shoppers through the experiment, stops the server and prints the experiment report
with its plot, then estimates each rule's margin from the randomized log (estimate-policy), as
a shop would before serving a rule. Every step prints the command a user would type; the
commands run in this process, which saves a dozen interpreter start-ups.

Example:
    python -m tools.demo                          # synthetic shop into var/demo
    python -m tools.demo --data online-retail     # the real Online Retail dataset
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import click

from admin.cli import cli as discountctl
from tools import demo_client
from trainer.cli import main as discount_train
from trainer.data import ONLINE_RETAIL

EXPERIMENT = "demo-tiered-vs-optimal"
STEPS = 11
DATA_SOURCES = ("synthetic", "online-retail")
LISTENING = re.compile(r"listening on \S+:(\d+)")


class DemoError(Exception):
    """A step failed; the message says which and why."""


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("var/demo")
    data: str = "synthetic"
    users: int = 3000
    items: int = 300
    shoppers: int = 3000
    seed: int = 7
    port: int = 0  # 0: a free port, read from discountd's log
    wait_s: float = 120.0


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def step(self, number: int, text: str) -> None:
        elapsed = time.monotonic() - self.start
        click.echo(f"\n==> [{elapsed:4.0f}s] {number}/{STEPS} {text}", err=True)


def run(command: click.Command, prog: str, *args: str, quiet: bool = False) -> str:
    """Run a CLI command in this process exactly as typed; returns what it wrote to stdout
    (also shown unless quiet). The command line goes to stderr first, so a reader can retype it."""
    click.echo(f"$ {prog} {shlex.join(args)}", err=True)
    captured = io.StringIO()
    try:
        with redirect_stdout(captured):
            status = command.main(args=list(args), prog_name=prog, standalone_mode=False)
    except click.ClickException as e:
        raise DemoError(f"{prog} {args[0]}: {e.format_message()}") from None
    except click.exceptions.Abort:
        raise DemoError(f"{prog} {args[0]}: aborted") from None
    if isinstance(status, int) and status != 0:
        raise DemoError(f"{prog} {args[0]} exited with status {status}")
    if not quiet:
        click.echo(captured.getvalue(), nl=False)
    return captured.getvalue()


class Discountd:
    """discountd in its own process, as in production; its log goes to a file."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def port(self, wait_s: float) -> int:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log_path.read_text(errors="replace"))
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                raise DemoError(f"discountd exited with status {self.process.returncode}")
            time.sleep(0.1)
        raise DemoError(f"discountd did not start listening within {wait_s:.0f}s")

    def stop(self) -> int:
        """SIGTERM (health NOT_SERVING, in-flight calls finish, the offer log is flushed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise DemoError("discountd did not stop within 60s of SIGTERM; killed it") from None

    def tail(self, lines: int = 5) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _discountd_executable() -> str:
    beside = Path(sys.executable).with_name("discountd")
    found = str(beside) if beside.exists() else shutil.which("discountd")
    if found is None:
        raise DemoError("the discountd command is missing: pip install -e . (or make demo)")
    return found


def _train(config: DemoConfig, clock: Clock) -> Path:
    """Steps 1 and 2; returns where replay takes the shop's users from."""
    out, seed = config.out, str(config.seed)
    models = str(out / "models")
    if config.data == "online-retail":
        clock.step(1, f"the Online Retail dataset ({ONLINE_RETAIL.parent})")
        clock.step(2, f"train, evaluate on a time hold-out, export ONNX into {models}")
        # The setting validation chose in docs/BENCHMARKS.md, so the demo fits no grid.
        run(discount_train, "discount-train", "fit", "--format", "online-retail",
            "--interactions", str(ONLINE_RETAIL), "--out", models, "--factors", "64",
            "--epochs", "15", "--regularization", "30", "--alpha", "4",
            "--confidence-offset", "0", "--seed", seed, quiet=True)  # fmt: skip
        click.echo(
            "note: Online Retail records no costs: fit assumed each from its --default-margin, "
            "and every discounted offer says COST_ASSUMED (the margin floor holds only as far "
            "as that margin does)",
            err=True,
        )
        return out / "models"
    shop = out / "shop"
    clock.step(1, f"a synthetic shop: {config.users:,} users, {config.items:,} items")
    run(discount_train, "discount-train", "synth", "--out", str(shop), "--users", str(config.users),
        "--items", str(config.items), "--seed", seed, quiet=True)  # fmt: skip
    clock.step(2, f"train, evaluate on a time hold-out, export ONNX into {models}")
    run(discount_train, "discount-train", "fit", "--interactions", str(shop / "interactions.csv"),
        "--items", str(shop / "items.csv"), "--out", models, "--factors", "32", "--epochs", "15",
        "--regularization", "10", "--alpha", "4", "--seed", seed, quiet=True)  # fmt: skip
    return shop / "interactions.csv"


def _train_response(config: DemoConfig, clock: Clock) -> Path:
    """Step 3: the response model the `optimal` rule prices with."""
    market, response = config.out / "market", config.out / "response"
    users = str(max(50, min(config.users // 2, 1500)))
    clock.step(3, "a response model from a randomized discount experiment in the market simulator")
    run(discount_train, "discount-train", "simulate", "--out", str(market), "--users", users,
        "--seed", str(config.seed), quiet=True)  # fmt: skip
    run(discount_train, "discount-train", "response", "--offers", str(market / "offers.csv"),
        "--events", str(market / "events.csv"), "--out", str(response), "--epochs", "5",
        "--hidden", "32", "--seed", str(config.seed), quiet=True)  # fmt: skip
    return response


def _seed_store(clock: Clock) -> None:
    """Steps 4 and 5: a migrated store with segments, two rules and a running experiment."""
    clock.step(4, f"a fresh store: {os.environ['DISCOUNT_DB_URL']}")
    # The commands below, retyped without it, would find no store (the default is another file).
    click.echo(
        f"$ export DISCOUNT_DB_URL={shlex.quote(os.environ['DISCOUNT_DB_URL'])} "
        f"DISCOUNT_ACTOR={shlex.quote(os.environ['DISCOUNT_ACTOR'])}",
        err=True,
    )
    run(discountctl, "discountctl", "db", "upgrade")
    clock.step(
        5, "segments (new, high value, lapsed), tiered_topk and optimal rules, an experiment"
    )
    for name, where, priority in (
        ("new-customers", "days_since_first_order < 30", "10"),
        ("high-value", "lifetime_value >= 400", "20"),
        ("lapsed", "days_since_last_order > 90", "30"),
    ):
        run(discountctl, "discountctl", "segments", "create", name, "--where", where,
            "--priority", priority, quiet=True)  # fmt: skip
    run(discountctl, "discountctl", "rules", "create", "demo-tiered", "--policy", "tiered_topk",
        "--param", "k1=2", "--param", "d1=15", "--param", "d2=5", "--max-discount", "20",
        "--min-margin", "10", "--priority", "10",
        "--description", "the 2 best recommendations 15% off, the rest 5%",
        quiet=True)  # fmt: skip
    run(discountctl, "discountctl", "rules", "create", "demo-optimal", "--policy", "optimal",
        "--param", "grid=[5,10,15,20]", "--max-discount", "20", "--min-margin", "10",
        "--priority", "5", "--description", "the discount with the largest expected margin",
        quiet=True)  # fmt: skip
    run(discountctl, "discountctl", "experiments", "create", EXPERIMENT, "--variant", "control:34",
        "--variant", "tiered:33:demo-tiered", "--variant", "optimal:33:demo-optimal",
        "--salt", "demo", "--description", "which discount pays: none, tiered or optimal?",
        quiet=True)  # fmt: skip
    run(discountctl, "discountctl", "experiments", "start", EXPERIMENT, quiet=True)
    run(discountctl, "discountctl", "segments", "list")
    run(discountctl, "discountctl", "rules", "list")


def demo(config: DemoConfig) -> None:
    clock = Clock()
    out = config.out
    if config.data == "online-retail" and not ONLINE_RETAIL.is_file():
        # Before emptying out: a demo that cannot run keeps the last one's store and report.
        raise DemoError(
            f"--data online-retail reads the UCI Online Retail data from {ONLINE_RETAIL} "
            f"(DISCOUNT_DATASETS, else ../shared/datasets beside the checkout), and it is not "
            f"there; {out} is left as "
            "it was"
        )
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.environ["DISCOUNT_DB_URL"] = f"sqlite:///{out / 'discount.db'}"
    os.environ["DISCOUNT_ACTOR"] = "demo"
    users_from = _train(config, clock)
    response = _train_response(config, clock)
    _seed_store(clock)
    models = out / "models"
    version = (models / "CURRENT").read_text().strip()
    clock.step(6, f"register and promote model version {version}; a token for the storefront")
    run(discountctl, "discountctl", "models", "register", str(models / version), quiet=True)
    run(discountctl, "discountctl", "models", "promote", version, quiet=True)
    created = run(discountctl, "discountctl", "clients", "create", "demo-storefront",
                  "--output", "json", quiet=True)  # fmt: skip
    os.environ["DISCOUNT_CLIENT_TOKEN"] = _token(created)
    click.echo(
        "(its token, kept as a storefront keeps it, is DISCOUNT_CLIENT_TOKEN from here on)",
        err=True,
    )

    clock.step(7, "start discountd (plaintext, public demo offer key, client auth required)")
    argv = [_discountd_executable(), "--model-dir", str(models),
            "--response-model-dir", str(response), "--host", "127.0.0.1",
            "--port", str(config.port), "--insecure", "--insecure-demo-key", "--auth", "required",
            "--rules-poll-interval", "1"]  # fmt: skip
    click.echo(f"$ {shlex.join(['discountd', *argv[1:]])} &", err=True)
    server = Discountd(argv, out / "discountd.log")
    try:
        target = f"127.0.0.1:{server.port(config.wait_s)}"
        click.echo(
            f"discountd pid {server.process.pid} on {target}, log {server.log_path}", err=True
        )
        clock.step(8, "recommendations for known users and a new visitor, as a storefront asks")
        run(demo_client.main, "python -m tools.demo_client", "--target", target,
            "--model-dir", str(models), "--wait", str(config.wait_s))  # fmt: skip
        clock.step(9, f"replay {config.shoppers:,} simulated shoppers through the experiment")
        run(discount_train, "discount-train", "replay", "--target", target,
            "--users-from", str(users_from), "--shoppers", str(config.shoppers),
            "--seed", str(config.seed))  # fmt: skip
        clock.step(10, "stop discountd (SIGTERM flushes the offer log); the experiment report")
        status = server.stop()
        if status != 0:
            raise DemoError(f"discountd exited with status {status} on SIGTERM")
    except BaseException:
        # Stopped before anything is written: after a SIGHUP the terminal may be gone, and a
        # write to it fails.
        if server.process.poll() is None:
            server.stop()
            click.echo(f"stopped discountd (pid {server.process.pid})", err=True)
        click.echo(f"discountd's last log lines ({server.log_path}):\n{server.tail()}", err=True)
        raise
    run(discountctl, "discountctl", "experiments", "report", EXPERIMENT,
        "--plot", str(out / "report.png"))  # fmt: skip
    clock.step(11, "each rule's margin estimated from a randomized log, before it serves anyone")
    # A shop's log would come from `discountctl offers export` of a `randomized` rule; the demo
    # has the simulator's, which trained the response model.
    rules = out / "rules.json"
    rules.write_text(run(discountctl, "discountctl", "rules", "list", "-o", "json", quiet=True))
    click.echo(f"(saved to {rules})", err=True)
    market = out / "market"
    run(discount_train, "discount-train", "estimate-policy", "--offers", str(market / "offers.csv"),
        "--events", str(market / "events.csv"), "--rules", str(rules),
        "--response-model", str(response))  # fmt: skip
    took = time.monotonic() - clock.start
    click.echo(f"\ndone in {took:.0f}s: plot {out / 'report.png'}, log {server.log_path}", err=True)
    _next_steps(config)


def _next_steps(config: DemoConfig) -> None:
    """What a reader can type next on the demo's store, which is not the default one."""
    out = config.out
    serve = ["discountd", "--model-dir", str(out / "models"),
             "--response-model-dir", str(out / "response"),
             "--insecure", "--insecure-demo-key", "--auth", "off"]  # fmt: skip
    lines = [
        "to look around its store and model (not the default store, var/discount.db):",
        f"  export DISCOUNT_DB_URL={shlex.quote(os.environ['DISCOUNT_DB_URL'])}",
        f"  discountctl experiments report {EXPERIMENT}",
        "  discountctl audit list",
        f"  {shlex.join(serve)} &",
        f"  python -m tools.demo_client --model-dir {shlex.quote(str(out / 'models'))}",
    ]
    click.echo("\n".join(lines), err=True)


def _token(created: str) -> str:
    token: str = json.loads(created)["token"]
    return token


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through demo(), which stops discountd


@click.command(epilog="Example: python -m tools.demo --shoppers 3000")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("var/demo"),
              show_default=True, help="Everything the demo makes; emptied first.")  # fmt: skip
@click.option("--data", type=click.Choice(DATA_SOURCES), default="synthetic", show_default=True,
              help="The shop: a synthetic one (discount-train synth), or the UCI Online Retail "
              "data (DISCOUNT_DATASETS, else ../shared/datasets).")  # fmt: skip
@click.option("--users", type=click.IntRange(min=20), default=3000, show_default=True,
              help="The synthetic shop's users (online-retail has its own); half as many, "
              "50 to 1,500, shop in the simulated log the response model learns from.")  # fmt: skip
@click.option("--items", type=click.IntRange(min=20), default=300, show_default=True,
              help="The synthetic shop's items (online-retail has its own).")  # fmt: skip
@click.option("--shoppers", type=click.IntRange(min=1), default=3000, show_default=True,
              help="Simulated shoppers replayed through the experiment.")  # fmt: skip
@click.option("--seed", type=int, default=7, show_default=True,
              help="Seeds the shop, the models, the simulator and the replay.")  # fmt: skip
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="discountd's port; 0 picks a free one.")  # fmt: skip
def main(out: Path, data: str, users: int, items: int, shoppers: int, seed: int, port: int) -> None:
    """Run the whole product on this machine: shop, model, store, discountd, shoppers, report."""
    config = DemoConfig(out, data, users, items, shoppers, seed, port)
    try:
        demo(config)
    except DemoError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    # SIGHUP: the terminal closed. It reaches discountd too, which takes it as "reload" and
    # would serve on, unsupervised, after the demo died of it.
    for _signal in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(_signal, _exit_on_signal)
    main()
