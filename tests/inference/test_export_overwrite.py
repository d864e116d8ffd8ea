"""`export --out` never replaces a file unasked (issue 22)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from pneumoscan.cli import app

runner = CliRunner()


def test_export_refuses_an_existing_out_file(tmp_path: Path) -> None:
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"someone's model")
    result = runner.invoke(app, ["export", "--out", str(mine)])
    assert result.exit_code == 2
    assert "exists; pass --overwrite to replace it" in result.output
    assert mine.read_bytes() == b"someone's model"
