"""The service under hostile uploads (issue 22): 4 concurrent uploads of each bomb.

Usage:
    .venv/bin/python benchmarks/serve_hostile.py [--concurrent 4]

Starts ``pneumoscan serve`` (as ``serve_load.py`` does), warms it with one real X-ray, then,
for each hostile file of ``tests/bombs.py`` (built from real X-rays), sends ``--concurrent``
uploads at once and prints the answers, the slowest answer's time and the server's peak
resident memory so far (``VmHWM`` of ``/proc/PID/status``). Target: every answer within 5 s,
the server under 1.5 GB.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import REPO, machine
from PIL import Image
from serve_load import start_server, stop_server

sys.path.insert(0, str(REPO / "tests"))
import bombs


def hostile_files() -> dict[str, tuple[str, bytes]]:
    """``label -> (file name, bytes)``; every file is under the 20 MB upload cap."""
    return {
        "real X-ray (baseline)": ("xray.png", _encoded(bombs.xray(1024), "PNG")),
        "1-bit PNG bomb 40000x40000": ("bomb.png", bombs.png_bomb(40000, whole=True)),
        "deflated DICOM, 2 GiB inflated": ("deflated.dcm", bombs.deflated_dicom(32768)),
        "JPEG DICOM, 512 header, 16000 stream": ("jpeg.dcm", bombs.dicom_jpeg(16000)),
        "J2K DICOM, 512 header, 7000 stream": ("j2k.dcm", bombs.dicom_j2k(7000)),
        "progressive JPEG, 10000 scans": ("scans.jpeg", bombs.scan_bomb(7000, 10_000)),
        "GIF": ("xray.gif", _encoded(bombs.xray(1024), "GIF")),
    }


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def upload(client: httpx.AsyncClient, url: str, name: str, data: bytes) -> tuple[float, str]:
    started = time.perf_counter()
    answer = await client.post(url + "/v1/predict", files={"files": (name, data)}, timeout=120)
    elapsed = time.perf_counter() - started
    if answer.status_code != 200:
        return elapsed, f"HTTP {answer.status_code}"
    (result,) = answer.json()["results"]
    reason = result.get("reason") or result.get("error") or ""
    return elapsed, f"{result['status']}: {str(reason).split(': ', 1)[-1][:90]}"


async def run(url: str, pid: int, concurrent: int) -> None:
    async with httpx.AsyncClient() as client:
        for label, (name, data) in hostile_files().items():
            answers = await asyncio.gather(
                *(upload(client, url, name, data) for _ in range(concurrent))
            )
            slowest = max(seconds for seconds, _ in answers)
            outcomes = sorted({outcome for _, outcome in answers})
            print(
                f"{label:38s} {len(data) / 2**20:6.1f} MB x{concurrent}  slowest {slowest:5.2f} s"
                f"  server peak {peak_rss_mb(pid):7.1f} MB  {'; '.join(outcomes)}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_server(None, args.backend, Path(folder) / "serve.log")
        try:
            print(f"server ready, peak {peak_rss_mb(process.pid):.1f} MB", flush=True)
            asyncio.run(run(url, process.pid, args.concurrent))
        finally:
            stop_server(process)


if __name__ == "__main__":
    main()
