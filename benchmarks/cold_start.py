"""Cold start: time from process start to the first prediction, Keras vs ONNX Runtime.

Usage (full size, as the lead runs it on a quiet machine; about 2 minutes):
    .venv/bin/python benchmarks/cold_start.py --runs 3

Quick check that it runs:
    .venv/bin/python benchmarks/cold_start.py --runs 1

Each run is a fresh ``pneumoscan predict IMAGE`` process (``subprocess`` timed with
``time.perf_counter`` from launch to exit; the command exits right after printing its one
result, so this is the time to the first prediction as a user sees it). Commands: the default
``pneumoscan predict IMAGE`` (the shipped model's int8 ONNX export, no TensorFlow import),
``--backend keras`` (the ``.keras`` file on TensorFlow), and a float32 ONNX file exported once
beforehand (``pneumoscan export --out FILE``, not timed) run with ``predict --model FILE``.
Prints each run and the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

from pneumoscan.constants import SAMPLES_DIR

PNEUMOSCAN = str(Path(sys.executable).with_name("pneumoscan"))


def timed(command: list[str]) -> float:
    """Seconds from launching ``command`` to its exit; fails loudly if it fails."""
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image", default=str(next(SAMPLES_DIR.glob("PNEUMONIA/*.jpeg"))))
    args = parser.parse_args()
    print(f"{machine()}; load average {os.getloadavg()[0]:.1f}; image {args.image}")
    with tempfile.TemporaryDirectory(prefix="pneumoscan-cold-") as tmp:
        onnx = str(Path(tmp) / "model.onnx")
        subprocess.run(
            [PNEUMOSCAN, "export", "--format", "onnx", "--out", onnx],
            check=True,
            capture_output=True,
        )
        commands = {
            "default (int8 onnx)": [PNEUMOSCAN, "predict", args.image],
            "keras (shipped model)": [PNEUMOSCAN, "predict", args.image, "--backend", "keras"],
            "onnx float32": [PNEUMOSCAN, "predict", args.image, "--model", onnx],
        }
        for name, command in commands.items():
            times = [timed(command) for _ in range(args.runs)]
            runs = ", ".join(f"{t:.2f}" for t in times)
            print(
                f"{name:22s}: median {statistics.median(times):5.2f} s to first prediction "
                f"(runs: {runs} s)"
            )


if __name__ == "__main__":
    main()
