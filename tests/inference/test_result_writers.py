"""Results files: one writer per format, the same columns everywhere, resume kept outside the
formats, and no user file replaced or erased without being asked (issue 18; issue 22 items 5,
7 and 9)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pneumoscan.cli import app
from pneumoscan.constants import SAMPLES_DIR
from pneumoscan.errors import InvalidInputError, OutputExistsError
from pneumoscan.inference.prediction import RESULT_FIELDS, Prediction
from pneumoscan.inference.writers import (
    WRITERS,
    completed_paths,
    open_writer,
    plan_resume,
    read_results,
)

from conftest import fixture_images

runner = CliRunner()

ODD_NAME = b"r\xe9sum\xe9-\xff.jpeg"  # Latin-1 bytes: not UTF-8


def _text(output: str) -> str:
    """Console output with Rich's line wrapping undone."""
    return " ".join(output.split())


def _predictions() -> list[Prediction]:
    return [
        Prediction.scored(0.91, 0.92).replace(path="a.jpeg", model_sha256="f" * 64),
        Prediction.failed("b.jpeg", "b.jpeg: damaged"),
        Prediction("c.png", "rejected", reason="does not look like a chest X-ray"),
        Prediction.failed(os.fsdecode(b"/x/" + ODD_NAME), "unreadable"),
    ]


@pytest.mark.parametrize("suffix", sorted(WRITERS))
def test_every_writer_keeps_the_columns_the_order_and_odd_names(
    tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"r{suffix}"
    writer = open_writer(out, about={"model": "m.onnx"})
    for prediction in _predictions():
        writer.write(prediction)
    writer.close()
    rows = read_results(out)
    odd = "/x/r\\xe9sum\\xe9-\\xff.jpeg"  # the bytes that are not UTF-8, readable
    assert [r["path"] for r in rows] == ["a.jpeg", "b.jpeg", "c.png", odd]
    assert [r["status"] for r in rows] == ["ok", "error", "rejected", "error"]
    assert float(rows[0]["probability"]) == 0.91 and rows[0]["decision"] == "NORMAL"
    assert str(rows[0]["near_threshold"]) == "True"  # 0.91 beside 0.92: read with care
    if suffix == ".parquet":
        assert pq.read_schema(out).names == list(RESULT_FIELDS)
        assert json.loads(pq.read_schema(out).metadata[b"pneumoscan"])["complete"] is True
    with pytest.raises(OutputExistsError, match="--overwrite"):
        open_writer(out)
    open_writer(out, overwrite=True).close()
    assert read_results(out) == []


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_replaces_retried_error_rows(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"r{suffix}"
    writer = open_writer(out)
    writer.write(Prediction("a", "ok", probability=0.5))
    writer.write(Prediction.failed("b", "b: damaged"))
    writer.write(Prediction.failed("c", "c: damaged"))
    writer.close()
    assert completed_paths(out) == {"a"}
    plan = plan_resume(out, ["a", "b", "c"])
    assert plan.done == {"a"} and [r["path"] for r in plan.kept] == ["a"]
    writer = open_writer(out, kept=plan.kept, resuming=True)
    writer.write(Prediction("b", "ok", probability=0.25))
    writer.write(Prediction.failed("c", "c: still"))
    writer.close()
    rows = read_results(out)
    assert [r["path"] for r in rows] == ["a", "b", "c"]
    assert rows[2]["error"] == "c: still"
    # The file itself has one row per path, not only what the reader shows.
    assert len(out.read_text().splitlines()) == 3 + (suffix == ".csv")


def test_reader_keeps_the_last_row_of_a_repeated_path(tmp_path: Path) -> None:
    out = tmp_path / "old.jsonl"
    out.write_text(
        '{"path": "x", "status": "error", "error": "first"}\n'
        '{"path": "y", "status": "ok"}\n'
        '{"path": "x", "status": "error", "error": "second"}\n'
    )
    assert [(r["path"], r.get("error")) for r in read_results(out)] == [
        ("x", "second"),
        ("y", None),
    ]


def test_resume_refuses_a_file_that_is_not_a_results_file(tmp_path: Path) -> None:
    # Issue 22, item 5: `--resume` on someone's spreadsheet erased its columns (exit 0).
    theirs = tmp_path / "patients.csv"
    original = "name,ward,notes\nAda,3,stable\nBo,4,discharged\n"
    theirs.write_text(original)
    result = runner.invoke(
        app, ["predict", str(fixture_images("NORMAL")[0]), "--out", str(theirs), "--resume"]
    )
    assert result.exit_code == 2 and "not a pneumoscan results file" in _text(result.output)
    assert theirs.read_text() == original
    extra = tmp_path / "extra.csv"
    extra.write_text("path,status,their_notes\na.jpeg,ok,keep me\n")
    with pytest.raises(InvalidInputError, match="their_notes"):
        plan_resume(extra, ["a.jpeg"])


def test_json_and_out_refuse_an_existing_file_unless_overwrite(tmp_path: Path) -> None:
    # Issue 22, item 5: `predict --json existing.json` overwrote it silently.
    image = str(fixture_images("NORMAL")[0])
    existing = tmp_path / "existing.json"
    existing.write_text('{"mine": true}\n')
    refused = runner.invoke(app, ["predict", image, "--json", str(existing)])
    assert refused.exit_code == 2 and "--overwrite" in _text(refused.output)
    assert existing.read_text() == '{"mine": true}\n'
    done = runner.invoke(app, ["predict", image, "--json", str(existing), "--overwrite"])
    assert done.exit_code == 0, done.output
    assert json.loads(existing.read_text())["results"][0]["path"] == image
    # Issue 18, defect 6: JSON is never written into a file named .csv.
    wrong = runner.invoke(app, ["predict", image, "--json", str(tmp_path / "res.csv")])
    assert wrong.exit_code == 2 and ".json" in _text(wrong.output)
    assert not (tmp_path / "res.csv").exists()


def test_json_after_resume_holds_every_row(tmp_path: Path) -> None:
    # Issue 22, item 9: `--json` after `--resume` held only that run's rows.
    samples = sorted(str(p) for p in SAMPLES_DIR.glob("*/*.jpeg"))
    out, report = tmp_path / "r.csv", tmp_path / "r.json"
    first = runner.invoke(app, ["predict", *samples[:2], "--out", str(out)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(
        app, ["predict", *samples, "--out", str(out), "--resume", "--json", str(report)]
    )
    assert again.exit_code == 0, again.output
    document = json.loads(report.read_text())
    assert [r["path"] for r in document["results"]] == samples
    assert document["complete"] is True
    # The rows kept from the CSV are typed like the new ones (numbers, not their text).
    assert all(isinstance(r["probability"], float) for r in document["results"])
    assert [r["path"] for r in read_results(out)] == samples


def test_predict_writes_parquet(tmp_path: Path) -> None:
    samples = sorted(str(p) for p in SAMPLES_DIR.glob("*/*.jpeg"))
    out = tmp_path / "x.parquet"
    result = runner.invoke(app, ["predict", *samples, "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column_names == list(RESULT_FIELDS)
    assert table.column("path").to_pylist() == samples
    assert str(table.schema.field("probability").type) == "double"
    # The subtype estimate of the shipped model's PNEUMONIA rows is a number, not text (a
    # results file once failed to write when a float met the text column).
    assert str(table.schema.field("p_viral").type) == "double"
    decided = dict(
        zip(table.column("decision").to_pylist(), table.column("p_viral").to_pylist(), strict=True)
    )
    assert decided["PNEUMONIA"] is not None and decided["NORMAL"] is None
    resumed = runner.invoke(app, ["predict", *samples, "--out", str(out), "--resume"])
    assert resumed.exit_code == 2 and ".csv or .jsonl" in _text(resumed.output)


def test_odd_names_become_rows_in_every_writer(tmp_path: Path) -> None:
    # Issue 22, item 7: a non-UTF-8 name ended a --out run with UnicodeEncodeError, and a path
    # longer than the OS allows ended predict with an OSError traceback before any row.
    folder = tmp_path / "inbox"
    folder.mkdir()
    odd = os.path.join(os.fsencode(folder), ODD_NAME)
    with open(odd, "wb") as handle:
        handle.write(fixture_images("NORMAL")[0].read_bytes())
    too_long = str(tmp_path / ("x" * 300 + ".jpeg"))
    for suffix in (".csv", ".jsonl", ".parquet"):
        out = tmp_path / f"odd{suffix}"
        result = runner.invoke(app, ["predict", str(folder), too_long, "--out", str(out)])
        assert result.exit_code == 0, result.output
        rows = read_results(out)
        assert [r["status"] for r in rows] == ["ok", "error"]
        assert rows[0]["path"].endswith("r\\xe9sum\\xe9-\\xff.jpeg")
        assert "File name too long" in rows[1]["error"]
    # A resumed run recognises the odd name as done.
    again = runner.invoke(
        app, ["predict", str(folder), "--out", str(tmp_path / "odd.csv"), "--resume"]
    )
    assert again.exit_code == 0 and "1 files already done" in _text(again.output)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_rows_read_back_as_the_predictions_written(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"r{suffix}"
    written = _predictions()[:3]
    writer = open_writer(out)
    for prediction in written:
        writer.write(prediction)
    writer.close()
    assert [Prediction.from_row(row) for row in read_results(out)] == written
