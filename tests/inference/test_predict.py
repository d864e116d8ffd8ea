"""Batch prediction: a pure batch function, streamed CSV / JSON lines output, resume, heatmaps."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import nonxray
from pneumoscan.cli import app
from pneumoscan.constants import DEFAULT_ONNX_PATH
from pneumoscan.data.pipeline import iter_decoded
from pneumoscan.data.preprocess import DecodeFailure, PreprocessConfig, decode_image
from pneumoscan.inference.export import file_sha256
from pneumoscan.inference.predict import (
    load_detector,
    make_scorer,
    predict_batch,
    predict_files,
)
from pneumoscan.inference.prediction import Prediction
from pneumoscan.inference.writers import completed_paths, open_writer, plan_resume, read_results
from pneumoscan.models.modelfile import LoadedModel, load_model

from conftest import FIXTURES, fixture_images

runner = CliRunner()


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Real X-rays, a text screenshot, an empty file, a truncated JPEG and a text file."""
    root = tmp_path / "inbox"
    shutil.copytree(FIXTURES / "NORMAL", root / "NORMAL")
    Image.fromarray(next(nonxray.text_images())[1]).save(root / "screenshot.png")
    (root / "empty.jpeg").write_bytes(b"")
    good = fixture_images("PNEUMONIA")[0].read_bytes()
    (root / "cut.jpeg").write_bytes(good[: len(good) // 3])
    (root / "notes.txt").write_text("not an image")
    return root


def test_predict_batch_is_a_pure_function_of_decoded_images(model: LoadedModel) -> None:
    decoded = [decode_image(p) for p in fixture_images("PNEUMONIA")[:3]]
    pixels = np.stack([d.pixels for d in decoded])
    blank = np.full((1, 224, 224, 3), 128, np.uint8)
    detector = load_detector(model)
    scorer = make_scorer(model, detector)
    batch = np.concatenate([pixels, blank])
    first = predict_batch(scorer, batch, detector=detector)
    again = predict_batch(scorer, batch, detector=detector)
    assert first == again
    assert [r.status for r in first] == ["ok", "ok", "ok", "rejected"]
    assert all(isinstance(r, Prediction) and r.path == "" for r in first)
    assert None not in (first[0].probability, first[0].decision, first[0].threshold)
    assert first[0].ood_score is not None
    alone = predict_batch(scorer, pixels[1:2], detector=detector)[0]
    assert alone.probability == pytest.approx(first[1].probability, abs=1e-6)
    unchecked = predict_batch(scorer, batch, ood_check=False)
    assert [r.status for r in unchecked] == ["ok"] * 4
    # The checks still say what they would have rejected.
    assert [r.warning is not None for r in unchecked] == [False, False, False, True]


def test_decoding_streams_in_order_whatever_the_batching(folder: Path) -> None:
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    batches = list(iter_decoded(files, PreprocessConfig(), batch_size=4, workers=2, prefetch=2))
    assert [start for start, _ in batches] == list(range(0, len(files), 4))
    flat = [item for _, items in batches for item in items]
    assert len(flat) == len(files)
    assert sum(isinstance(item, DecodeFailure) for item in flat) == 3  # empty, cut, notes


def test_one_bad_file_never_stops_the_batch(model: LoadedModel, folder: Path) -> None:
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    results = list(predict_files(model, files, batch_size=5))
    assert [r.path for r in results] == files
    by_name = {Path(r.path).name: r for r in results}
    assert by_name["screenshot.png"].status == "rejected"
    assert str(by_name["screenshot.png"].reason).startswith("does not look like")
    for name, message in (("empty.jpeg", "empty"), ("cut.jpeg", "truncated"), ("notes.txt", "not")):
        assert by_name[name].status == "error" and message in str(by_name[name].reason)
    assert sum(r.status == "ok" for r in results) == len(fixture_images("NORMAL"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_writer_appends_and_resume_skips_done_files(
    model: LoadedModel, folder: Path, tmp_path: Path, suffix: str
) -> None:
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    out = tmp_path / f"results{suffix}"
    writer = open_writer(out)
    for result in predict_files(model, files[:10], batch_size=4):
        writer.write(result)
    writer.close()
    # A killed run can leave half a line behind.
    with out.open("a") as handle:
        handle.write('{"path": "half' if suffix == ".jsonl" else "half,ok,0.")
    with pytest.raises(FileExistsError, match="--resume"):
        open_writer(out)
    done = completed_paths(out)
    assert len(done) == 10 - sum(Path(f).name in {"cut.jpeg", "empty.jpeg"} for f in files[:10])
    plan = plan_resume(out, files)
    assert plan.done == done
    writer = open_writer(out, kept=plan.kept, resuming=True)
    for result in predict_files(model, [f for f in files if f not in done], batch_size=4):
        writer.write(result)
    writer.close()
    rows = read_results(out)
    final = [r for r in rows if r["status"] in ("ok", "rejected")]
    assert sorted(r["path"] for r in final) == sorted(set(r["path"] for r in final))
    assert {r["path"] for r in rows} == set(files)
    assert len(out.read_text().splitlines()) == len(files) + (suffix == ".csv")
    if suffix == ".csv":
        header = out.read_text().splitlines()[0]
        assert header.startswith("path,status,probability,decision,near_threshold,op_score")
        with out.open() as handle:
            assert next(csv.DictReader(handle))["path"] == files[0]


def test_cli_streams_resumes_and_draws_heatmaps(folder: Path, tmp_path: Path) -> None:
    out, heatmaps, report = tmp_path / "r.jsonl", tmp_path / "heatmaps", tmp_path / "r.json"
    args = ["predict", str(folder), "--out", str(out), "--heatmaps", str(heatmaps)]
    result = runner.invoke(app, [*args, "--json", str(report), "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "1 rejected" in result.output and "3 unreadable" in result.output
    rows = read_results(out)
    document = json.loads(report.read_text())
    assert rows == document["results"] and document["complete"] is True
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(list(heatmaps.glob("*.png"))) == len(ok) > 0
    overlay = Image.open(ok[0]["heatmap"])
    assert overlay.format == "PNG" and overlay.width > 200
    again = runner.invoke(app, [*args[:4], "--resume"])
    assert again.exit_code == 0, again.output
    assert "already done" in again.output
    # The 3 retried errors replace their rows: one row per input, in the file itself too.
    assert len(read_results(out)) == len(rows) == len(out.read_text().splitlines())
    refused = runner.invoke(app, args[:4])
    assert refused.exit_code == 2 and "--resume" in refused.output
    # The heatmaps came from the Keras network, the scores from the int8 export: one answer.
    assert {r["model_sha256"] for r in rows} == {file_sha256(DEFAULT_ONNX_PATH)}


def test_cli_without_ood_check_scores_the_screenshot(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    result = runner.invoke(
        app, ["predict", str(folder / "screenshot.png"), "--no-ood-check", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    (row,) = read_results(out)
    assert row["status"] == "ok" and 0.0 <= float(row["probability"]) <= 1.0


def test_every_result_records_the_model_version_and_time(
    model: LoadedModel, folder: Path, tmp_path: Path
) -> None:
    from datetime import datetime

    from pneumoscan import __version__
    from pneumoscan.inference.prediction import RESULT_FIELDS

    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())[-6:]
    out = tmp_path / "r.csv"
    writer = open_writer(out)
    for result in predict_files(model, files, batch_size=4):
        writer.write(result)
    writer.close()
    rows = read_results(out)
    assert len(rows) == len(files) and {r["status"] for r in rows} >= {"ok", "error"}
    sha = file_sha256(model.path)
    for row in rows:  # errors too: every row says which model and version saw the file
        assert row["model_sha256"] == sha and row["pneumoscan_version"] == __version__
        assert datetime.fromisoformat(row["scored_at"]).utcoffset().total_seconds() == 0
    assert out.read_text().splitlines()[0] == ",".join(RESULT_FIELDS)


def test_resume_reads_and_upgrades_a_file_without_the_new_columns(
    model: LoadedModel, folder: Path, tmp_path: Path
) -> None:
    files = sorted(str(p) for p in (folder / "NORMAL").glob("*"))[:4]
    out = tmp_path / "old.csv"
    old_fields = ["path", "status", "probability", "decision", "threshold", "ood_score"]
    with out.open("w", newline="") as handle:  # as written before model_sha256 existed
        writer = csv.DictWriter(handle, old_fields, lineterminator="\n")
        writer.writeheader()
        writer.writerow({"path": files[0], "status": "ok", "probability": 0.1,
                         "decision": "NORMAL", "threshold": 0.5})  # fmt: skip
    assert completed_paths(out) == {files[0]}
    plan = plan_resume(out, files)
    writer = open_writer(out, kept=plan.kept, resuming=True)
    for result in predict_files(model, files[1:], batch_size=4):
        writer.write(result)
    writer.close()
    rows = read_results(out)
    assert [r["path"] for r in rows] == files
    assert None not in rows[-1] and rows[-1]["model_sha256"]  # cells line up with the header
    assert rows[0]["probability"] == "0.1" and rows[0]["model_sha256"] == ""
    assert completed_paths(out) == set(files)


def test_table_shows_names_sorted_likely_pneumonia_first(tmp_path: Path) -> None:
    from pneumoscan.cli import display_names, sort_results

    results = [
        Prediction("/a/very/long/folder/NORMAL/1.jpeg", "ok", probability=0.2),
        Prediction("/x/bad.png", "error", error="x"),
        Prediction("/a/very/long/folder/PNEUMONIA/1.jpeg", "ok", probability=0.9),
        Prediction("/x/shot.png", "rejected", reason="y"),
        Prediction("/x/c.jpeg", "ok", probability=0.5),
    ]
    by_p = [r.path for r in sort_results(results, "probability")]
    assert by_p == [results[i].path for i in (2, 4, 0, 3, 1)]
    assert sort_results(results, "input") == results
    assert [r.path for r in sort_results(results, "path")] == sorted(r.path for r in results)
    names = display_names([r.path for r in results])
    assert names["/x/c.jpeg"] == "c.jpeg"
    assert names["/a/very/long/folder/NORMAL/1.jpeg"] == "NORMAL/1.jpeg"  # same name twice

    out = tmp_path / "r.csv"
    result = runner.invoke(app, ["predict", "--samples", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    shown = [n for n in ("person127_bacteria_603", "person127_bacteria_604", "IM-0006", "IM-0031")
             if any(n in line for line in lines)]  # fmt: skip
    assert len(shown) == 4 and "…" not in result.output and "/src/" not in result.output
    order = [next(i for i, line in enumerate(lines) if n in line) for n in shown]
    written = read_results(out)
    probability = {Path(r["path"]).name: float(r["probability"]) for r in written}
    by_name = {n: next(p for k, p in probability.items() if k.startswith(n)) for n in shown}
    assert sorted(shown, key=lambda n: order[shown.index(n)]) == sorted(
        shown, key=lambda n: -by_name[n]
    )
    # The streamed file keeps input order (the sample folders, NORMAL first).
    assert [Path(r["path"]).parent.name for r in written] == ["NORMAL"] * 2 + ["PNEUMONIA"] * 2
    bad = runner.invoke(app, ["predict", "--samples", "--sort", "size"])
    assert bad.exit_code == 2 and "--sort" in bad.output
