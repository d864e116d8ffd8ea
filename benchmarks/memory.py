"""Peak memory of ``pneumoscan predict`` and ``pneumoscan evaluate`` on small vs large folders.

``predict`` runs as a user runs it (the shipped model's int8 ONNX export), and once more with
``--backend keras``; ``evaluate`` scores the ``.keras`` model.

Usage (full size, as the lead runs it on a quiet machine; about 10-20 minutes on 2 cores):
    .venv/bin/python benchmarks/memory.py --small 500 --large 5000

Quick check that it runs:
    .venv/bin/python benchmarks/memory.py --small 20 --large 60

Folders of ``NORMAL/`` and ``PNEUMONIA/`` are built from symlinks to the shared 224x224
training images (both classes in their data-set proportion). Each command runs once per size
in its own subprocess; its peak resident set size comes from ``os.wait4`` (the rusage of that
one child, ``ru_maxrss``), so an earlier, bigger child cannot mask a later one as
``getrusage(RUSAGE_CHILDREN)`` would. Goal: large/small peak RSS within 10% (memory does not
grow with the number of images).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA, machine

from pneumoscan.constants import CLASSES

PNEUMOSCAN = str(Path(sys.executable).with_name("pneumoscan"))


def build_folder(n: int, folder: Path) -> None:
    """``n`` shared training images as symlinks, classes in the training set's proportion."""
    train = SHARED_DATA / "chest_xray" / "train"
    images = [p for label in CLASSES for p in sorted((train / label).glob("*.jpeg"))]
    step = len(images) / n
    for i in range(n):
        # Repeats (n > 5,216) get a distinct name; the spread keeps both classes in.
        source = images[int(i * step) % len(images)]
        target = folder / source.parent.name / f"{i:05d}_{source.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source, target)


def peak_rss(command: list[str], cwd: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one run of ``command`` in ``cwd``."""
    started = time.perf_counter()
    # Run in the temporary folder: evaluate writes confusion_matrix.png to the working folder.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command} failed: {stderr[-2000:]}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--large", type=int, default=5000)
    args = parser.parse_args()
    print(f"{machine()}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="pneumoscan-memory-") as tmp:
        root = Path(tmp)
        folders = {n: root / f"images{n}" for n in (args.small, args.large)}
        for n, folder in folders.items():
            build_folder(n, folder)
        commands = {
            "predict": lambda folder: [
                PNEUMOSCAN,
                "predict",
                str(folder),
                "--out",
                str(folder) + ".csv",
            ],
            "predict --backend keras": lambda folder: [
                PNEUMOSCAN,
                "predict",
                str(folder),
                "--backend",
                "keras",
                "--out",
                str(folder) + ".keras.csv",
            ],
            "evaluate": lambda folder: [
                PNEUMOSCAN,
                "evaluate",
                str(folder),
                "--json",
                str(folder) + ".json",
            ],
        }
        for name, command in commands.items():
            peaks = {}
            for n, folder in folders.items():
                peaks[n], seconds = peak_rss(command(folder), root)
                print(f"{name:24s} {n:6d} images: peak RSS {peaks[n]:7.1f} MiB ({seconds:.0f} s)")
            ratio = peaks[args.large] / peaks[args.small]
            print(
                f"{name:24s} ratio {args.large}/{args.small}: {ratio:.3f} "
                f"({'within' if abs(ratio - 1) <= 0.10 else 'outside'} the 10% goal)"
            )


if __name__ == "__main__":
    main()
