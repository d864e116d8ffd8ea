"""One firewall for every reader of a data set (issue 22, item 4): a hostile file in a class
folder is listed as unreadable by audit and evaluate; neither ends with a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import bombs
from pneumoscan.cli import app

from conftest import FIXTURES

runner = CliRunner()


@pytest.fixture
def hostile_data(tmp_path: Path) -> Path:
    data = tmp_path / "xrays"
    shutil.copytree(FIXTURES, data)
    bombs.write(data / "NORMAL" / "bomb.png", bombs.png_bomb(40000))  # DecompressionBombError
    bombs.write(data / "PNEUMONIA" / "scans.jpeg", bombs.scan_bomb(side=1024, repeats=500))
    bombs.write(data / "NORMAL" / "deflated.png", bombs.deflated_dicom(8192))
    return data


def test_audit_lists_hostile_files_as_unreadable(hostile_data: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(hostile_data), "--out", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    assert result.exception is None
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    listed = json.dumps(report)
    for name in ("bomb.png", "scans.jpeg", "deflated.png"):
        assert name in listed


def test_evaluate_skips_hostile_files(hostile_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    result = runner.invoke(app, ["evaluate", str(hostile_data), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert result.exception is None
    skipped = json.dumps(json.loads(out.read_text()).get("skipped"))
    for name in ("bomb.png", "scans.jpeg", "deflated.png"):
        assert name in skipped
