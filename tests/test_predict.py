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
from pneumoscan.modelfile import LoadedModel, load_model
from pneumoscan.predict import (
    ResultWriter,
    completed_paths,
    iter_decoded,
    load_detector,
    make_scorer,
    predict_batch,
    predict_files,
    read_results,
)
from pneumoscan.preprocess import PreprocessConfig, decode_image

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
    assert [r["status"] for r in first] == ["ok", "ok", "ok", "rejected"]
    assert all("path" not in r for r in first)
    assert {"probability", "decision", "threshold", "ood_score"} <= set(first[0])
    alone = predict_batch(scorer, pixels[1:2], detector=detector)[0]
    assert alone["probability"] == pytest.approx(first[1]["probability"], abs=1e-6)
    unchecked = predict_batch(scorer, batch, ood_check=False)
    assert [r["status"] for r in unchecked] == ["ok"] * 4


def test_decoding_streams_in_order_whatever_the_batching(folder: Path) -> None:
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    batches = list(iter_decoded(files, PreprocessConfig(), batch_size=4, workers=2, prefetch=2))
    assert [start for start, _ in batches] == list(range(0, len(files), 4))
    flat = [item for _, items in batches for item in items]
    assert len(flat) == len(files)
    assert sum(isinstance(item, str) for item in flat) == 3  # empty, cut, notes


def test_one_bad_file_never_stops_the_batch(model: LoadedModel, folder: Path) -> None:
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    results = list(predict_files(model, files, batch_size=5))
    assert [r["path"] for r in results] == files
    by_name = {Path(r["path"]).name: r for r in results}
    assert by_name["screenshot.png"]["status"] == "rejected"
    assert by_name["screenshot.png"]["reason"].startswith("does not look like")
    for name, message in (("empty.jpeg", "empty"), ("cut.jpeg", "truncated"), ("notes.txt", "not")):
        assert by_name[name]["status"] == "error" and message in by_name[name]["reason"]
    assert sum(r["status"] == "ok" for r in results) == len(fixture_images("NORMAL"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_writer_appends_and_resume_skips_done_files(
    model: LoadedModel, folder: Path, tmp_path: Path, suffix: str
) -> None:
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    out = tmp_path / f"results{suffix}"
    with ResultWriter(out) as writer:
        for result in predict_files(model, files[:10], batch_size=4):
            writer.write(result)
    # A killed run can leave half a line behind.
    with out.open("a") as handle:
        handle.write('{"path": "half' if suffix == ".jsonl" else "half,ok,0.")
    with pytest.raises(FileExistsError, match="--resume"):
        ResultWriter(out)
    done = completed_paths(out)
    assert len(done) == 10 - sum(Path(f).name in {"cut.jpeg", "empty.jpeg"} for f in files[:10])
    with ResultWriter(out, resume=True) as writer:
        for result in predict_files(model, [f for f in files if f not in done], batch_size=4):
            writer.write(result)
    rows = read_results(out)
    final = [r for r in rows if r["status"] in ("ok", "rejected")]
    assert sorted(r["path"] for r in final) == sorted(set(r["path"] for r in final))
    assert {r["path"] for r in rows} == set(files)
    if suffix == ".csv":
        header = out.read_text().splitlines()[0]
        assert header.startswith("path,status,probability,decision,threshold,ood_score,reason")
        with out.open() as handle:
            assert next(csv.DictReader(handle))["path"] == files[0]


def test_cli_streams_resumes_and_draws_heatmaps(folder: Path, tmp_path: Path) -> None:
    out, heatmaps, report = tmp_path / "r.jsonl", tmp_path / "heatmaps", tmp_path / "r.json"
    args = ["predict", str(folder), "--out", str(out), "--heatmaps", str(heatmaps)]
    result = runner.invoke(app, [*args, "--json", str(report), "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "1 rejected" in result.output and "3 unreadable" in result.output
    rows = read_results(out)
    assert rows == json.loads(report.read_text())["results"]  # --json keeps its shape
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


def test_cli_without_ood_check_scores_the_screenshot(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    result = runner.invoke(
        app, ["predict", str(folder / "screenshot.png"), "--no-ood-check", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    (row,) = read_results(out)
    assert row["status"] == "ok" and 0.0 <= float(row["probability"]) <= 1.0
