"""`discountctl segments ...`"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator
from typing import IO, Any

import click
from sqlalchemy.orm import Session

from admin.app import App
from admin.options import confirm, if_version_option, parse_json, yes_option
from admin.output import emit, message, output_option, updated
from core.segments import ConditionError, parse_expression, to_json
from core.store import validate
from core.store.errors import InvalidInput
from core.store.experiments import Experiments
from core.store.segments import Segments
from core.store.tables import Segment

COLUMNS = ("name", "kind", "priority", "condition", "member_count", "version")


@click.group()
def segments() -> None:
    """Named groups of users: a condition over user features, or an imported member list."""


def _condition(condition: str | None, where: tuple[str, ...]) -> object | None:
    if condition is not None and where:
        raise click.UsageError("give either --condition or --where, not both")
    if condition is not None:
        parsed: object = parse_json(condition, "--condition")
        if parsed is None:
            raise InvalidInput(
                "--condition: null is not a condition; leave it out for a member list"
            )
        return parsed
    if not where:
        return None
    try:
        leaves = [to_json(parse_expression(w)) for w in where]
    except ConditionError as e:
        raise InvalidInput(f"invalid segment condition: {e}") from None
    return leaves[0] if len(leaves) == 1 else {"all": leaves}


condition_options = [
    click.option(
        "--condition",
        metavar="JSON",
        help='Structured condition, e.g. \'{"any": [{"feature": "order_count", "op": ">=", '
        '"value": 5}]}\'.',
    ),
    click.option(
        "--where",
        multiple=True,
        metavar="EXPR",
        help="FEATURE OP VALUE, e.g. 'lifetime_value >= 500'; repeat to require all.",
    ),
]


def _with_condition_options(f: Any) -> Any:
    for option in reversed(condition_options):
        f = option(f)
    return f


@segments.command("create")
@click.argument("name")
@_with_condition_options
@click.option("--description", default="", help="Free text for people.")
@click.option(
    "--priority",
    type=int,
    default=100,
    show_default=True,
    help="Lower is tried first.",
)
@output_option
@click.pass_obj
def create(
    app: App,
    name: str,
    condition: str | None,
    where: tuple[str, ...],
    description: str,
    priority: int,
    output: str,
) -> None:
    """Create a segment. Without --condition/--where it is a member list; fill it with
    `segments import-members`.

    \b
    Example:
      discountctl segments create new-customers --where 'days_since_first_order < 30'
    """
    with app.transaction() as session:
        repo = Segments(session, app.actor)
        segment = repo.create(name, _condition(condition, where), description, priority)
        data = repo.as_dict(segment)
    message(f"created segment {name!r}")
    emit(data, output)


@segments.command("list")
@output_option
@click.pass_obj
def list_(app: App, output: str) -> None:
    """List segments in the order they are tried (priority, then name).

    \b
    Example:
      discountctl segments list --output json
    """
    with app.transaction() as session:
        repo = Segments(session)
        data = [repo.as_dict(s) for s in repo.list_all()]
    emit(data, output, COLUMNS)


@segments.command("show")
@click.argument("name")
@output_option
@click.pass_obj
def show(app: App, name: str, output: str) -> None:
    """Show one segment.

    \b
    Example:
      discountctl segments show new-customers
    """
    with app.transaction() as session:
        repo = Segments(session)
        data = repo.as_dict(repo.get(name))
    emit(data, output)


@segments.command("update")
@click.argument("name")
@click.option("--name", "new_name", help="Rename the segment.")
@_with_condition_options
@click.option("--description", help="Free text for people.")
@click.option("--priority", type=int, help="Lower is tried first.")
@if_version_option
@output_option
@click.pass_obj
def update(
    app: App,
    name: str,
    new_name: str | None,
    condition: str | None,
    where: tuple[str, ...],
    description: str | None,
    priority: int | None,
    if_version: int | None,
    output: str,
) -> None:
    """Change a segment; options left out keep their value.

    \b
    Example:
      discountctl segments update high-value --where 'lifetime_value >= 800' --if-version 1
    """
    with app.transaction() as session:
        repo = Segments(session, app.actor)
        before = repo.get(name)
        version, old_condition = before.version, before.condition
        segment = repo.update(
            name, if_version, new_name, description, _condition(condition, where), priority
        )
        data = repo.as_dict(segment)
        notes = _measured_notes(session, segment) if segment.condition != old_condition else []
    updated("segment", data["name"], version, data["version"])
    for note in notes:
        message(note)
    emit(data, output)


@segments.command("delete")
@click.argument("name")
@if_version_option
@yes_option
@output_option
@click.pass_obj
def delete(app: App, name: str, if_version: int | None, yes: bool, output: str) -> None:
    """Delete a segment and its members. Refused while a rule or experiment uses it.

    \b
    Example:
      discountctl segments delete lapsed --yes
    """
    with app.transaction() as session:
        repo = Segments(session, app.actor)
        repo.get(name)
        confirm(f"Delete segment {name!r}?", yes)
        data = repo.delete(name, if_version)
    message(f"deleted segment {name!r}")
    emit(data, output)


@segments.command("import-members")
@click.argument("name")
# utf-8-sig: spreadsheets save CSV with a byte-order mark, which would hide the user_id header.
@click.argument("file", type=click.File("r", encoding="utf-8-sig"))
@click.option("--replace", is_flag=True, help="Replace the members instead of adding to them.")
@output_option
@click.pass_obj
def import_members(app: App, name: str, file: IO[str], replace: bool, output: str) -> None:
    """Add user ids to a member-list segment from FILE ('-' for stdin): one id per line, or a
    CSV with a user_id column.

    \b
    Example:
      discountctl segments import-members vip vip_users.csv
    """
    user_ids = _read_ids(file)
    with app.transaction() as session:
        repo = Segments(session, app.actor)
        # Locked: an import into it at the same moment waits, so before is what this one
        # changes.
        before = repo.as_dict(repo.get(name, for_update=True))
        segment, added = repo.import_members(name, user_ids, replace)
        data = {**repo.as_dict(segment), "added": added}
        changed = data["version"] != before["version"]
        notes = _measured_notes(session, segment) if changed else []
    if not changed:
        message(f"segment {name!r} unchanged: {data['member_count']} member(s)")
    else:
        removed = before["member_count"] + added - data["member_count"]
        message(
            f"segment {name!r}: {added} new member(s)"
            + (f", {removed} removed" if replace else "")
            + f", {data['member_count']} in all"
        )
    for note in notes:
        message(note)
    emit(data, output)


def _measured_notes(session: Session, segment: Segment) -> list[str]:
    """A note per running experiment whose users a change of who is in the segment moves: the
    change is allowed (a segment is the shop's to keep current), but the experiment measures a
    different population from now on. A paused one gets none: it resumes on the segment as it
    is then, and `experiments start` names what it shares."""
    experiments = Experiments(session)
    notes = [
        f"note: segment {segment.name!r} is the target of running experiment {e.key!r}: who "
        "takes part changes from now on, so its results mix the old population and the new"
        for e in experiments.running()
        if e.target_segment_id == segment.id
    ]
    for key, variant, rule in experiments.running_variants_scoped_by(segment):
        notes.append(
            f"note: segment {segment.name!r} scopes rule {rule!r}, which prices variant "
            f"{variant!r} of running experiment {key!r}: which of the variant's users get its "
            "discounts changes from now on"
        )
    return notes


# A first line holding one of these is a CSV header, whose columns they separate.
DELIMITERS = (",", ";", "\t")


def _read_ids(file: IO[str]) -> list[str]:
    """One id per line, or a CSV whose header names a user_id column (read as CSV throughout:
    quoted fields, a quoted field over several lines); blank lines are skipped and ids stripped
    of surrounding spaces. Each id is checked here, so that a bad one is named by its line."""
    # A stream without a name (stdin in Click's test runner) is stdin.
    label = getattr(file, "name", "<stdin>")
    lines = _decoded(file, label)
    skipped, header = 0, ""
    for header in lines:
        if header.strip():
            break
        skipped += 1
    if not header.strip():
        return []
    delimiter = _header_delimiter(header)
    if delimiter is None:
        # A header that named no user_id column would otherwise be imported as ids, and each
        # of its rows as one id, commas and all.
        if any(d in header.strip() for d in DELIMITERS):
            found = header.strip()
            # Its start only: ids separated by commas on one line can be megabytes long.
            shown = repr(found) if len(found) <= 80 else f"{found[:60]!r}... ({len(found):,} chars)"
            raise InvalidInput(
                f"{label}: line {skipped + 1} is a CSV header without a user_id column (found "
                f"{shown}); name the id column user_id, or give one id per line without a header"
            )
        numbered = enumerate(itertools.chain([header], lines), start=skipped + 1)
        return [_checked(line.strip(), label, n) for n, line in numbered if line.strip()]
    # Strict: a stray quote is an error at its line, not a field that swallows the rows after it.
    reader = csv.reader(itertools.chain([header], lines), delimiter=delimiter, strict=True)
    ids = []
    try:
        columns = [c.strip().lower() for c in next(reader)]
        if "user_id" not in columns:  # a quote in the header ran on past its line
            raise csv.Error("the header's quotes do not close on its line")
        column = columns.index("user_id")
        for row in reader:
            number = skipped + reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            user_id = row[column].strip() if column < len(row) else ""
            if not user_id:
                raise InvalidInput(
                    f"{label}: line {number} has no user_id; fill it in or remove the line"
                )
            ids.append(_checked(user_id, label, number))
    except csv.Error as e:
        raise InvalidInput(
            f"{label}: line {skipped + reader.line_num} is not valid CSV ({e}); check its quotes"
        ) from None
    return ids


def _decoded(file: IO[str], label: str) -> Iterator[str]:
    try:
        # Not `yield from`: closing this generator would close the file (stdin too).
        for line in file:  # noqa: UP028
            yield line
    except UnicodeDecodeError:
        raise InvalidInput(f"{label}: not UTF-8 text; save it as UTF-8 and import again") from None


def _header_delimiter(line: str) -> str | None:
    """The delimiter under which line, read as CSV, has a user_id column; None if none does."""
    for delimiter in DELIMITERS:
        try:
            columns = next(csv.reader([line], delimiter=delimiter), [])
        except csv.Error:  # e.g. a field past the csv module's 128 KiB limit: no header
            continue
        if "user_id" in (c.strip().lower() for c in columns):
            return delimiter
    return None


def _checked(user_id: str, label: str, number: int) -> str:
    try:
        return validate.ident("user id", user_id)
    except InvalidInput as e:
        raise InvalidInput(f"{label}: line {number}: {e}") from None
