"""Call a running discountd the way a shop's service would and print recommendations as tables.

Example:
    python -m tools.demo_client --target 127.0.0.1:50051 --model-dir var/models
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.artifact import ArtifactError, current_version_dir
from discount.v1 import discount_pb2 as pb
from discount.v1 import discount_pb2_grpc as pb_grpc
from trainer.client_auth import channel_credentials, client_options

COLD_START = {
    pb.COLD_START_UNSPECIFIED: "known user",
    pb.COLD_START_FOLD_IN: "unknown user, folded in from recent items",
    pb.COLD_START_POPULARITY: "unknown user, most popular items",
}


@click.command(epilog="Example: python -m tools.demo_client --model-dir var/models")
@click.option("--target", default="127.0.0.1:50051", show_default=True, help="discountd address.")
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Model store to pick known users from when no --user is given.",
)
@click.option("--user", "users", multiple=True, help="Known user id to show (repeatable).")
@click.option("--limit", default=5, show_default=True, help="Items per user.")
@click.option("--wait", default=30.0, show_default=True, help="Seconds to wait for SERVING.")
@client_options
def main(
    target: str,
    model_dir: Path | None,
    users: tuple[str, ...],
    limit: int,
    wait: float,
    token: str | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Print recommendations for a few known users and one unknown user."""
    known = list(users) or _first_users(model_dir, 3)
    if not known:
        raise click.UsageError("give --user ID (repeatable) or --model-dir to pick users from")
    credentials = channel_credentials(tls_ca, tls_cert, tls_key)
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with channel:
        _wait_until_serving(channel, target, wait)
        stub = pb_grpc.DiscountServiceStub(channel)
        try:
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)
            click.echo(
                f"model {info.model_version} on {info.provider}: "
                f"{info.item_count} items, {info.user_count} users"
            )
            first: list[str] = []
            for user in known:
                reply = stub.Recommend(
                    pb.RecommendRequest(user_id=user, limit=limit), metadata=metadata
                )
                _print_table(user, reply)
                first = first or [item.item_id for item in reply.items[:2]]
            # A visitor the model never saw, who just looked at the first user's top items.
            visitor = stub.Recommend(
                pb.RecommendRequest(user_id="demo-new-visitor", limit=limit, recent_item_ids=first),
                metadata=metadata,
            )
            _print_table(f"demo-new-visitor (recent: {', '.join(first) or 'none'})", visitor)
        except grpc.RpcError as e:
            hint = (
                "; pass --token TOKEN (or set DISCOUNT_CLIENT_TOKEN)"
                if e.code() == grpc.StatusCode.UNAUTHENTICATED
                else ""
            )
            raise click.ClickException(f"{target}: {e.code().name}: {e.details()}{hint}") from None


def _first_users(model_dir: Path | None, count: int) -> list[str]:
    if model_dir is None:
        return []
    try:
        version = current_version_dir(model_dir)
        users: list[str] = json.loads((version / "users.json").read_text())
    except (ArtifactError, OSError, ValueError) as e:
        raise click.ClickException(f"cannot read users from {model_dir}: {e}") from None
    return users[:count]


def _wait_until_serving(channel: grpc.Channel, target: str, wait: float) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + wait
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as e:
            last = f"{e.code().name}: {e.details()}"
        time.sleep(0.2)
    raise click.ClickException(
        f"{target} not SERVING after {wait:.0f}s ({last}); is discountd running there?"
    )


def _print_table(title: str, reply: pb.RecommendResponse) -> None:
    click.echo(f"\n{title} — {COLD_START[reply.cold_start_path]}")
    rows = [(str(i.rank), i.item_id, i.category or "-", f"{i.score:.3f}") for i in reply.items]
    header = ("rank", "item_id", "category", "score")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(4)]
    for row in [header, *rows]:
        click.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    if not rows:
        click.echo("  (no items pass the filters)")


if __name__ == "__main__":
    main()
