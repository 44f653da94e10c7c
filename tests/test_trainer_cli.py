"""Every `discount-train` command explains itself with an example."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import click
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from trainer.cli import main
from trainer.config import ModelConfig
from trainer.entry import TRAIN_EXTRA
from trainer.export import ExportError
from trainer.fit import grid
from trainer.model import Diverged
from trainer.offer_log import OFFER_COLUMNS
from trainer.uplift import HILLSTROM


def test_every_command_has_help_with_an_example() -> None:
    assert isinstance(main, click.Group)
    for name in main.commands:
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, result.output
        assert f"Example: discount-train {name} " in result.output, name


def test_every_option_says_what_it_does() -> None:
    assert isinstance(main, click.Group)
    silent = [
        f"{name} {param.opts[0]}"
        for name, command in main.commands.items()
        for param in command.params
        if isinstance(param, click.Option) and not param.help
    ]
    assert silent == []


def test_uplift_help_says_where_its_default_data_is_not_this_install_path() -> None:
    result = CliRunner().invoke(main, ["uplift", "--help"])
    shown = "".join(result.output.split())  # unwrapped: click breaks long lines
    assert "../shared/datasets/hillstrom/hillstrom.csv" in shown
    assert str(HILLSTROM) not in shown


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["train"])
    assert result.exit_code == 2
    assert "No such command 'train'" in result.output


def test_without_the_training_extra_the_command_says_what_to_install() -> None:
    """A serving install has discount-train but not pandas or torch: one line, no traceback."""
    probe = (
        "import sys; sys.modules['pandas'] = sys.modules['torch'] = None; "
        "sys.argv = ['discount-train', '--help']; from trainer.entry import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "pip install 'discountd[train]'" in done.stderr


def test_the_entry_point_looks_up_every_package_of_the_training_extra() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["train"]
    assert {re.split(r"[<>=!~\[; ]", package)[0] for package in extra} == set(TRAIN_EXTRA)


def test_help_and_usage_errors_load_nothing_the_commands_run() -> None:
    """torch, pandas, scipy and onnx take seconds to import: only a command's body loads them,
    so --help (the group's and each command's) and usage errors answer at once."""
    probe = """
import sys
import click
import trainer.entry
from trainer.cli import main
for args in (["--help"], *([name, "--help"] for name in main.commands), ["fit"], ["train"]):
    try:
        main(args, standalone_mode=False)
    except click.UsageError:
        pass
heavy = ("torch", "pandas", "scipy", "onnx", "onnxruntime", "matplotlib")
print("loaded:", [name for name in heavy if name in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("loaded: []\n")


def test_with_the_training_extra_the_entry_point_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from trainer.entry import main; main()", "--help"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "fit" in done.stdout


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A small synthetic shop's files, as fit's --interactions and --items."""
    out = tmp_path_factory.mktemp("shop")
    made = CliRunner().invoke(main, ["synth", "--out", str(out), "--users", "60", "--items", "30"])
    assert made.exit_code == 0, made.output
    return ["--interactions", str(out / "interactions.csv"), "--items", str(out / "items.csv")]


def fit(shop: list[str], out: Path, *extra: str) -> Result:
    return CliRunner().invoke(main, ["fit", *shop, "--out", str(out), *extra])


def test_bpr_trains_each_regularization_once_and_refuses_ials_settings(
    shop: list[str], tmp_path: Path
) -> None:
    small = ("--objective", "bpr", "--epochs", "1", "--factors", "4")
    result = fit(shop, tmp_path / "m", *small)
    assert result.exit_code == 0, result.output
    # BPR's own default λ, once: not iALS's λ grid, nor each λ for every α × c₀ of iALS's.
    tried = [line for line in result.output.splitlines() if line.startswith("bpr: ")]
    assert tried == ["bpr: factors=4 regularization=0.01"]
    # BPR has no α or c₀: nothing it prints or records claims one.
    assert "chosen: bpr: factors=4 regularization=0.01, " in result.output
    assert "alpha" not in result.output and "offset" not in result.output
    training = _manifest(result)["training"]
    assert (training["alpha"], training["confidence_offset"]) == (None, None)
    assert training["candidates"] == ["bpr: factors=4 regularization=0.01"]
    for flag in ("--alpha", "--confidence-offset"):
        refused = fit(shop, tmp_path / "m", *small, flag, "2")
        assert refused.exit_code == 2
        assert f"{flag}: iALS settings; --objective bpr has none" in refused.output


def test_alpha_0_alone_trains_with_the_offsets_it_can_pair_with(
    shop: list[str], tmp_path: Path
) -> None:
    """The default grid holds c₀ = 0: only α = 0 with c₀ = 0 has nothing to learn."""
    result = fit(shop, tmp_path / "m", "--alpha", "0", "--factors", "4", "--epochs", "1")
    assert result.exit_code == 0, result.output
    tried = [line for line in result.output.splitlines() if line.startswith("ials: ")]
    assert tried == [
        "ials: factors=4 regularization=10 alpha=0 confidence_offset=1",
        "ials: factors=4 regularization=30 alpha=0 confidence_offset=1",
    ]


def test_a_value_given_twice_is_one_candidate() -> None:
    candidates = grid(ModelConfig(), (5.0, 5.0, 2.0), (1.0, 1.0), (0.0,))
    assert [(c.regularization, c.alpha) for c in candidates] == [(5.0, 1.0), (2.0, 1.0)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--regularization", "0"], "'--regularization': 0.0 is not in the range x>0"),
        (["--format", "online-retail"], "--items is for --format files"),
        (["--alpha", "0", "--confidence-offset", "0"], "gives every purchase zero confidence"),
        # nan passes every bound of a plain FloatRange, and a nan setting trains a model of nans.
        (["--alpha", "nan"], "'--alpha': 'nan' is not a finite number"),
        (["--regularization", "inf"], "'--regularization': 'inf' is not a finite number"),
        (["--default-margin", "nan"], "'--default-margin': 'nan' is not a finite number"),
        (["--seed", "-1"], "'--seed': -1 is not in the range 0<=x<=4294967295"),
    ],
)
def test_nonsense_options_are_usage_errors(
    shop: list[str], tmp_path: Path, extra: list[str], message: str
) -> None:
    result = fit(shop, tmp_path / "m", *extra)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "m").exists()


def test_a_diverged_training_writes_nothing(shop: list[str], tmp_path: Path) -> None:
    result = fit(shop, tmp_path / "m", "--factors", "4", "--epochs", "2", "--alpha", "1e30")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1].startswith(
        "Error: training diverged: the factors are not finite (ials, regularization"
    )
    assert not (tmp_path / "m").exists()  # no version, no CURRENT, not even the folder


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["simulate", "--out", "x", "--seed", "-1"], "'--seed': -1 is not in the range"),
        (["uplift", "--seed", "4294967296"], "'--seed': 4294967296 is not in the range"),
        (["uplift", "--learning-rate", "1e300"], "'--learning-rate': 1e+300 is not in the range"),
        (["replay", "--target", "x:1", "--wait", "nan"], "'--wait': 'nan' is not a finite number"),
        (["replay", "--target", "x:1", "--wait", "-5"], "'--wait': -5.0 is not in the range"),
    ],
)
def test_other_commands_refuse_nonsense_numbers_before_any_work(
    command: list[str], message: str
) -> None:
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_run_that_fails_leaves_no_folder_it_made_behind(tmp_path: Path) -> None:
    missing = ["--interactions", str(tmp_path / "nope.csv"), "--items", str(tmp_path / "nope.csv")]
    result = fit(missing, tmp_path / "never" / "deep" / "store")
    assert result.exit_code == 1 and "no such file" in result.output
    assert not (tmp_path / "never").exists()


def test_an_unwritable_out_fails_before_reading_or_training(
    shop: list[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = fit(shop, blocker / "models")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {blocker / 'models'}: cannot write the model (")
    assert "read " not in result.output


def test_a_failed_export_check_is_one_line(
    shop: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No small shop makes the real export check fail on demand: the failure is injected."""

    def broken(*_: object) -> None:
        raise ExportError("score.onnx differs from PyTorch by up to 1.02e+03")

    monkeypatch.setattr("trainer.fit.fit", broken)
    result = fit(shop, tmp_path / "m")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1].startswith(
        "Error: the trained model failed its export check (score.onnx differs"
    )
    assert "Traceback" not in result.output


def test_an_out_that_is_a_file_is_refused_in_one_line(shop: list[str], tmp_path: Path) -> None:
    """Exit 1 like every other unwritable --out (TRAINING.md), not click's usage error."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = fit(shop, blocker)
    assert result.exit_code == 1
    assert (
        result.output
        == f"Error: {blocker}: cannot write the model ({blocker} is a file, not a folder)\n"
    )


def test_a_report_under_a_file_names_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(
        main, ["evaluate-policy", "--json", str(blocker / "x.json"), "--seeds", "1"]
    )
    assert result.exit_code == 1
    assert (
        result.output
        == f"Error: {blocker}: cannot write x.json ({blocker} is a file, not a folder)\n"
    )


def _dates_only_shop(folder: Path, days: int) -> list[str]:
    """Each of 60 shoppers buys a new item every day; timestamps are dates only."""
    folder.mkdir()
    rows = [f"u{u},i{(u + d) % 18},2024-03-{d + 1:02d}\n" for d in range(days) for u in range(60)]
    (folder / "i.csv").write_text("user_id,item_id,timestamp\n" + "".join(rows))
    (folder / "items.csv").write_text("item_id,price\n" + "".join(f"i{i},5\n" for i in range(18)))
    return ["--interactions", str(folder / "i.csv"), "--items", str(folder / "items.csv")]


def _manifest(result: Result) -> dict[str, Any]:
    version = json.loads(result.stdout.strip().splitlines()[-1])["version_dir"]
    return json.loads((Path(version) / "manifest.json").read_text())


TWO = ("--factors", "4", "--epochs", "2", "--alpha", "1", "--confidence-offset", "1",
       "--regularization", "10", "--regularization", "30")  # fmt: skip


def test_dates_only_data_is_validated_and_compares_every_candidate(tmp_path: Path) -> None:
    """The last day holds a seventh of the rows, so the hold-out is one day long: the validation
    window before it must still hold a day, or fit trains blind on the first candidate."""
    result = fit(_dates_only_shop(tmp_path / "shop", days=7), tmp_path / "m", *TWO)
    assert result.exit_code == 0, result.output
    assert "validation: global time split at 2024-03-06 00:00 UTC, 60 users" in result.output
    manifest = _manifest(result)
    assert manifest["training"]["candidates"] == [
        "ials: factors=4 regularization=10 alpha=1 confidence_offset=1",
        "ials: factors=4 regularization=30 alpha=1 confidence_offset=1",
    ]
    assert manifest["training"]["chosen_by"] == "best validation NDCG@10"
    assert "loses_to_popularity" in manifest["metrics"]


def test_training_blind_says_which_candidate_and_claims_no_comparison(tmp_path: Path) -> None:
    """Two days of dates: the validation window is the first day, with no history before it."""
    result = fit(_dates_only_shop(tmp_path / "shop", days=2), tmp_path / "m", *TWO)
    assert result.exit_code == 0, result.output
    assert (
        "; training 2 epochs blind with the first candidate given, ials: factors=4 "
        "regularization=10 alpha=1 confidence_offset=1; 1 other candidate(s) not tried"
    ) in result.output
    training = _manifest(result)["training"]
    assert training["candidates"] == []
    assert training["chosen_by"] == "first of 2 candidates given, untested: no validation users"
    assert training["regularization"] == 10.0


def test_an_out_that_is_a_model_version_is_refused_naming_the_store(
    shop: list[str], tmp_path: Path
) -> None:
    """A version nested in a version is served by nobody, yet fit would report it current."""
    store = tmp_path / "models"
    first = fit(shop, store, *TWO)
    assert first.exit_code == 0, first.output
    version = Path(json.loads(first.stdout.strip().splitlines()[-1])["version_dir"])
    inside = set(version.iterdir())
    result = fit(shop, version, *TWO)
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {version}: is a model version (it has manifest.json); give the model store "
        f"folder above it, --out {store}\n"
    )
    assert set(version.iterdir()) == inside


def test_sizes_beyond_memory_are_one_line_not_a_traceback() -> None:
    """An allocation that fails (numpy's, here), as a user meets it through the entry point."""
    probe = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30)); "
        "sys.argv = ['discount-train', 'synth', '--out', sys.argv[1], '--users', '90000000']; "
        "from trainer.entry import main; main()"
    )
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", probe, out], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "discount-train: not enough memory for the sizes asked for; try fewer users, items, "
        "factors or hidden units"
    ]


def _broken_gzip(folder: Path, kind: str) -> Path:
    """A gzipped CSV cut off half way, or with its compressed stream garbled."""
    rows = "".join(f"u{i},i{i * 7919 % 1000},{1700000000 + i}\n" for i in range(20_000))
    packed = gzip.compress(f"user_id,item_id,timestamp\n{rows}".encode())
    path = folder / f"{kind}.csv.gz"
    if kind == "truncated":
        path.write_bytes(packed[: len(packed) // 2])
    else:
        path.write_bytes(packed[:10] + bytes(range(256)) * 4)
    return path


@pytest.mark.parametrize("kind", ["truncated", "corrupt"])
@pytest.mark.parametrize(
    "command",
    [
        ["fit", "--interactions", "{bad}", "--items", "{items}", "--out", "{tmp}/m"],
        ["fit", "--interactions", "{interactions}", "--items", "{bad}", "--out", "{tmp}/m"],
        ["response", "--offers", "{bad}", "--events", "{items}", "--out", "{tmp}/r"],
        ["response", "--offers", "{offers}", "--events", "{bad}", "--out", "{tmp}/r"],
        ["uplift", "--data", "{bad}"],
        ["replay", "--target", "127.0.0.1:9", "--users-from", "{bad}"],
    ],
    ids=["fit interactions", "fit items", "response offers", "response events", "uplift", "replay"],
)
def test_a_broken_gzip_input_is_named_in_one_line(
    shop: list[str], tmp_path: Path, kind: str, command: list[str]
) -> None:
    """gzip raises EOFError (truncated) or zlib.error (corrupt): click made the first a bare
    "Aborted!" and the second a traceback."""
    bad = _broken_gzip(tmp_path, kind)
    # An offer log with every column, so that the events are what is refused.
    (tmp_path / "offers.csv").write_text(",".join(OFFER_COLUMNS) + "\n")
    names = {
        "{bad}": str(bad),
        "{offers}": str(tmp_path / "offers.csv"),
        "{interactions}": shop[1],
        "{items}": shop[3],
        "{tmp}": str(tmp_path),
    }
    args = [names.get(a, a.replace("{tmp}", str(tmp_path))) for a in command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {bad}: "), result.output
    assert result.output.count("\n") == 1, result.output


def test_users_from_a_parquet_without_user_ids_is_one_line(tmp_path: Path) -> None:
    """pyarrow's message lists the file's whole schema, over several lines."""
    path = tmp_path / "users.parquet"
    pd.DataFrame({"customer": ["a", "b"], "n": [1, 2]}).to_parquet(path)
    result = CliRunner().invoke(
        main, ["replay", "--target", "127.0.0.1:9", "--users-from", str(path)]
    )
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {path}: cannot read user ids (")
    assert result.output.count("\n") == 1, result.output


SMALL_RUNS = {
    "synth": (["synth", "--users", "20", "--items", "10"], ("interactions.csv", "items.csv")),
    "simulate": (["simulate", "--users", "20", "--visits", "1"], ("offers.csv", "events.csv")),
}


@pytest.mark.parametrize("command", SMALL_RUNS)
@pytest.mark.parametrize("which", [0, 1])
def test_synthetic_data_never_replaces_a_file_already_there(
    tmp_path: Path, command: str, which: int
) -> None:
    """A shop's own files carry these names: a synthetic run over them would replace them."""
    args, names = SMALL_RUNS[command]
    mine = tmp_path / names[which]
    mine.write_text("the shop's own\n")
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {tmp_path}: already holds {names[which]}; pick another --out or delete them\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [names[which]]
    assert mine.read_text() == "the shop's own\n"


@pytest.mark.parametrize("command", SMALL_RUNS)
def test_synthetic_data_under_a_file_is_refused_in_one_line(tmp_path: Path, command: str) -> None:
    """Exit 1, as fit and response refuse an --out they cannot write, not click's usage error."""
    args, _ = SMALL_RUNS[command]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "deeper"):
        result = CliRunner().invoke(main, [*args, "--out", str(out)])
        assert result.exit_code == 1, result.output
        assert result.output.startswith(f"Error: {out}: cannot write the ")
        assert result.output.endswith(f"({blocker} is a file, not a folder)\n")


def test_a_diverged_bpr_suggests_only_what_bpr_has(
    shop: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No small shop makes BPR diverge on demand: the failure is injected."""

    def diverged(*_: object) -> None:
        raise Diverged("training diverged: the factors are not finite (bpr, regularization 0.01)")

    monkeypatch.setattr("trainer.fit.fit", diverged)
    result = fit(shop, tmp_path / "m", "--objective", "bpr")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1].endswith(
        "; nothing was written. A larger --regularization usually fixes this."
    )


def test_a_diverging_candidate_is_dropped_and_the_others_compete(
    shop: list[str], tmp_path: Path
) -> None:
    result = fit(shop, tmp_path / "m", "--factors", "4", "--regularization", "10",
                 "--alpha", "1", "--alpha", "1e300", "--confidence-offset", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        "  dropped: training diverged: the factors are not finite (ials, regularization 10, "
        "alpha 1e+300)" in result.output
    )
    assert "chosen: ials: factors=4 regularization=10 alpha=1 " in result.output
    assert (tmp_path / "m" / "CURRENT").exists()


def test_a_diverging_candidate_stops_at_once_without_raw_warnings(
    shop: list[str], tmp_path: Path
) -> None:
    """A subprocess, as a user runs it: in pytest, pytest itself would catch numpy's warnings.
    Training on printed nan losses and numpy's overflow warnings before the one-line error."""
    args = ["fit", *shop, "--out", str(tmp_path / "m"), "--factors", "4", "--regularization",
            "1e-300", "--alpha", "1e300", "--confidence-offset", "0"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", "from trainer.cli import main; main()", *args],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[-2] == "ials: factors=4 regularization=1e-300 alpha=1e+300 confidence_offset=0"
    assert lines[-1] == (
        "Error: training diverged: the factors are not finite (ials, regularization 1e-300, "
        "alpha 1e+300); nothing was written. A smaller --alpha or a larger --regularization "
        "usually fixes this."
    )
    assert "Warning" not in done.stderr
    assert not (tmp_path / "m").exists()


def test_data_without_a_purchase_is_refused(tmp_path: Path) -> None:
    """Views only: the model trained and became CURRENT in a new store."""
    rows = [
        f"u{u},i{(u * 7 + d) % 18},2024-03-{d + 1:02d},view\n" for d in range(20) for u in range(60)
    ]
    (tmp_path / "i.csv").write_text("user_id,item_id,timestamp,event\n" + "".join(rows))
    (tmp_path / "items.csv").write_text("item_id,price\n" + "".join(f"i{i},5\n" for i in range(18)))
    files = ["--interactions", str(tmp_path / "i.csv"), "--items", str(tmp_path / "items.csv")]
    result = fit(files, tmp_path / "m", *TWO)
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        f"Error: {tmp_path / 'i.csv'}, {tmp_path / 'items.csv'}: no purchases to learn from "
        "(every row kept is a view, click or cart); fit needs a purchase history"
    )
    assert not (tmp_path / "m").exists()


def test_a_margin_for_movielens_which_has_no_prices_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["fit", "--format", "movielens", "--default-margin", "0.5", "--out", str(tmp_path / "m")],
    )
    assert result.exit_code == 2
    assert "--default-margin: MovieLens has no prices, so no margin to assume" in result.output


@pytest.mark.parametrize(
    ("format_name", "missing"), [("online-retail", "online-retail"), ("movielens", "ml-100k")]
)
def test_a_public_dataset_not_there_says_where_it_was_looked_for_and_how_to_give_it(
    tmp_path: Path, format_name: str, missing: str
) -> None:
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    args = ["fit", "--format", format_name, "--out", str(tmp_path / "m")]
    done = subprocess.run(
        [sys.executable, "-c", "from trainer.entry import main; main()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "DISCOUNT_DATASETS": str(datasets)},
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"Error: {datasets / missing}")
    assert "DISCOUNT_DATASETS" in line and "--interactions" in line
    assert not (tmp_path / "m").exists()
