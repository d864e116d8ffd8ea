"""What pneumoscan writes outside the files it is told to write (issue 22)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pneumoscan.constants import DEFAULT_ONNX_PATH

SCRIPT = """
import sys
from pneumoscan.inference.scorer import onnx_session
session = onnx_session(sys.argv[1])
print(session.get_providers()[0])
"""


def test_onnx_runtime_writes_no_telemetry_into_the_home_folder(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    environment |= {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / ".cache")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(DEFAULT_ONNX_PATH)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == "CPUExecutionProvider"
    # ONNX Runtime 1.32 wrote deviceid and onnxruntime.db (a ProcessInfo event naming the
    # OS, the interpreter and the network) under ~/.cache/Microsoft/DeveloperTools.
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()] == []
