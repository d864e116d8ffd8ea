"""`predict --engine ray` on a local Ray cluster: the same rows as local predict, one per input.

The cluster (``ray.init(num_cpus=2)``, local, no dashboard) is started once for the module;
the tests that need it skip with the reason when Ray is not installed (the ``ray`` extra).
"""

from __future__ import annotations

import secrets
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pneumoscan.cli import app
from pneumoscan.data.dicom import write_dicom
from pneumoscan.errors import InvalidInputError
from pneumoscan.inference import writers
from pneumoscan.inference.predict import Problem, list_inputs
from pneumoscan.inference.prediction import ModelIdentity, Prediction
from pneumoscan.inference.predictor import Predictor
from pneumoscan.scale import ray_engine
from pneumoscan.scale.ray_engine import list_sources, predict_archive, read_manifest

from conftest import SHARED_TRAIN, SITE_SAMPLE, needs_shared

#: Training images added to the site sample (204) through a manifest: about 300 X-rays.
TRAINING_IMAGES = 90


@pytest.fixture(scope="module")
def cluster() -> Any:
    """A local two-CPU Ray cluster for the module, with token authentication on and its
    token in the environment (a new local cluster would otherwise save one in ~/.ray)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'pneumoscan[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (the ray extra)")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("RAY_AUTH_MODE", raising=False)  # a new local cluster: token mode
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        env.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        env.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Real X-rays as a folder and a manifest, plus bad files: a text file, a truncated JPEG,
    a DICOM made from an X-ray, an empty folder, and a manifest path that does not exist."""
    root = tmp_path_factory.mktemp("archive")
    training = sorted(SHARED_TRAIN.glob("*/*.jpeg"))[:: 5216 // TRAINING_IMAGES][:TRAINING_IMAGES]
    missing = root / "gone" / "person9999_bacteria_1.jpeg"
    manifest = root / "manifest.csv"
    lines = ["path", *map(str, training[:40]), str(missing), *map(str, training[40:])]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an X-ray\n", encoding="utf-8")
    (bad / "_hidden.jpeg").write_bytes(training[0].read_bytes())  # Ray's own listing skips it
    (bad / "truncated.jpeg").write_bytes(training[1].read_bytes()[:2500])
    grey = np.asarray(Image.open(training[2]).convert("L"))
    write_dicom(grey, bad / "study.dcm", "MONOCHROME2", 8)
    (bad / "empty.jpeg").mkdir()  # a folder named like an image
    sources = [str(SITE_SAMPLE), str(manifest), str(bad)]
    # What local predict is given for the same inputs: the manifest's paths in its place.
    local = [str(SITE_SAMPLE), *lines[1:], str(bad)]
    return {"root": root, "sources": sources, "local": local, "manifest": manifest}


def _local_rows(inputs: list[str]) -> list[dict[str, Any]]:
    predictor = Predictor.open()
    return [p.as_row() for p in predictor.predict_entries(list_inputs(inputs))]


def _assert_same_rows(ray_rows: list[dict[str, Any]], local_rows: list[dict[str, Any]]) -> None:
    # Typed as predictions: a CSV file's empty cell and a Parquet null both mean none.
    ray_rows = [Prediction.from_row(r).as_row() for r in ray_rows]
    assert [r["path"] for r in ray_rows] == [r["path"] for r in local_rows]
    assert len({r["path"] for r in ray_rows}) == len(ray_rows)  # exactly one row per input
    for ours, theirs in zip(ray_rows, local_rows, strict=True):
        assert ours["status"] == theirs["status"], ours["path"]
        assert ours["reason"] == theirs["reason"], ours["path"]
        assert ours["decision"] == theirs["decision"], ours["path"]
        if theirs["probability"] is None:
            assert ours["probability"] is None, ours["path"]
        else:
            assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-5)
            assert ours["ood_score"] == pytest.approx(theirs["ood_score"], abs=1e-5)


@needs_shared
def test_ray_rows_equal_local_predict(
    cluster: Any, archive: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "results.parquet"
    seen: list[Prediction] = []
    run = predict_archive(archive["sources"], out, on_result=seen.append)
    local = _local_rows(archive["local"])
    ray_rows = writers.read_results(out)
    assert len(ray_rows) == len(seen) == len(local) >= 300
    _assert_same_rows(ray_rows, local)
    statuses = {r["path"].rsplit("/", 1)[-1]: r["status"] for r in ray_rows}
    assert statuses["notes.txt"] == statuses["truncated.jpeg"] == "error"
    assert statuses["empty.jpeg"] == statuses["person9999_bacteria_1.jpeg"] == "error"
    assert statuses["study.dcm"] == statuses["_hidden.jpeg"] == "ok"
    assert run.counts["ok"] >= 290 and run.actors == 2
    # The same columns and schema as local predict's Parquet file.
    assert pq.read_schema(out).names == list(writers.parquet_schema().names)


@needs_shared
def test_resume_skips_what_is_done_and_keeps_one_row_each(
    cluster: Any, archive: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "results.parquet"
    first = [str(archive["root"] / "bad"), *map(str, sorted(SITE_SAMPLE.glob("*/*.jpeg"))[:8])]
    predict_archive(first, out, actors=1)
    before = writers.read_results(out)
    with pytest.raises(FileExistsError):
        predict_archive(first, out)  # neither --resume nor --overwrite
    extra = sorted(SITE_SAMPLE.glob("NORMAL/*.jpeg"))[-3:]
    run = predict_archive([*first, *map(str, extra)], out, actors=1, resume=True)
    after = writers.read_results(out)
    errors = sum(r["status"] == "error" for r in before)
    assert errors == 3 and run.done_before == len(before) - errors
    assert run.scored == errors + len(extra)  # errors are retried, new files scored
    assert len(after) == len({r["path"] for r in after}) == len(before) + len(extra)
    kept = {r["path"]: r["probability"] for r in before if r["status"] == "ok"}
    assert {r["path"]: r["probability"] for r in after if r["path"] in kept} == kept


@needs_shared
def test_cli_engine_ray(cluster: Any, tmp_path: Path) -> None:
    folder = tmp_path / "xrays"
    shutil.copytree(SITE_SAMPLE / "NORMAL", folder)
    out = tmp_path / "results.csv"
    result = CliRunner().invoke(
        app, ["predict", str(folder), "--engine", "ray", "--actors", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    rows = writers.read_results(out)
    assert len(rows) == len(list(folder.iterdir())) and "on ray" in result.output
    _assert_same_rows(rows, _local_rows([str(folder)]))


def test_cli_engine_ray_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(tmp_path), "--engine", "ray"])
    assert result.exit_code == 2 and "--engine ray needs --out" in result.output
    result = runner.invoke(app, ["predict", str(tmp_path), "--engine", "spark"])
    assert result.exit_code == 2 and "unknown --engine" in result.output


def test_cli_says_when_the_ray_job_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(*args: Any, on_start: Any, on_result: Any, **options: Any) -> None:
        on_start(3, SimpleNamespace(note=None))
        on_result(None)
        raise RuntimeError("actor died\n(traceback lines)")

    monkeypatch.setattr(ray_engine, "predict_archive", broken)
    out = tmp_path / "r.parquet"
    result = CliRunner().invoke(app, ["predict", str(tmp_path), "--engine", "ray", "-o", str(out)])
    assert result.exit_code == 1
    assert "the Ray job failed after 1 inputs: RuntimeError: actor died;" in result.output
    assert "--resume" in result.output and "traceback lines" not in result.output


def test_manifest_is_read_in_order_with_its_problems(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"{i}.jpeg") for i in range(3)]
    manifest = pa.table({"path": [paths[0], "", paths[2]], "label": [0, 1, 0]})
    pq.write_table(manifest, tmp_path / "m.parquet")
    assert read_manifest(tmp_path / "m.parquet") == [paths[0], "", paths[2]]
    entries = list_sources([tmp_path / "m.parquet"])
    assert [e.path if isinstance(e, Problem) else e for e in entries] == [
        paths[0], f"{tmp_path / 'm.parquet'}:2", paths[2]
    ]  # fmt: skip
    (tmp_path / "m.csv").write_text("file\nx.jpeg\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="'path' column"):
        read_manifest(tmp_path / "m.csv")


def test_oversized_files_are_refused_on_the_driver_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PNEUMOSCAN_MAX_FILE_MB", "0.001")
    big = tmp_path / "big.jpeg"
    big.write_bytes(b"\xff\xd8" + bytes(4096))
    (entry,) = list_sources([big])
    assert isinstance(entry, Problem) and "limit per file" in entry.message


def test_a_file_gone_before_the_cluster_read_it_is_an_error_row() -> None:
    identity = ModelIdentity("m", "m.onnx", "onnx", 0.5, None)
    entries: list[Any] = ["a.jpeg", Problem("b", "b: no such file or folder"), "c.jpeg"]
    row = Prediction.scored(0.7, 0.5).replace(path=str(Path("c.jpeg").resolve())).as_row()
    merged = list(ray_engine._in_input_order(entries, iter([row]), identity))
    assert [(p.path, p.status) for p in merged] == [
        ("a.jpeg", "error"), ("b", "error"), ("c.jpeg", "ok")
    ]  # fmt: skip
    assert "went away" in str(merged[0].error)


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InvalidInputError, match=r"pip install 'pneumoscan\[ray\]'"):
        ray_engine.require_ray()
