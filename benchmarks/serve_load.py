"""Load test of ``pneumoscan serve``: N concurrent clients posting real X-rays on loopback.

Usage:
    python benchmarks/serve_load.py [--clients 50] [--requests 500] [--heatmap]
        [--files-per-request 1] [--url http://127.0.0.1:PORT] [--model M]
        [--max-seconds 300] [--json OUT]

Without ``--url`` it starts ``pneumoscan serve`` on a free port of 127.0.0.1, waits for
``/health``, runs, and stops it. With ``--url`` the server must be on a loopback address: this
script never sends traffic anywhere else. The run is bounded: it sends at most ``--requests``
requests and stops issuing new ones after ``--max-seconds`` (requests still in flight then
get ``--timeout`` seconds to finish and count as errors if they do not).

Images: real X-rays from ``../shared/data/site_sample`` (both classes), else the repository's
fixtures; request ``i`` sends image ``i`` modulo their number. Prints requests/s, latency
percentiles and the error count (HTTP errors and failed requests), plus results that were not
``ok``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from common import REPO, SHARED_DATA, machine

API_KEY_ENV = "PNEUMOSCAN_API_KEY"
START_TIMEOUT_S = 180.0


@dataclass
class Tally:
    """What the clients saw."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    results: dict[str, int] = field(default_factory=dict)
    sent: int = 0

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def xray_files(limit: int = 20) -> list[Path]:
    """Real X-rays of both classes (the site sample, else the test fixtures)."""
    root = SHARED_DATA / "site_sample"
    if not root.is_dir():
        root = REPO / "tests" / "fixtures" / "xrays"
    per_class = limit // 2
    files = [
        p
        for label in ("PNEUMONIA", "NORMAL")
        for p in sorted((root / label).glob("*.jpeg"))[:per_class]
    ]
    if not files:
        raise SystemExit(f"no X-rays found under {root}")
    return files


def check_loopback(url: str) -> str:
    """The URL without a trailing slash, if its host is a loopback address.

    Raises:
        SystemExit: Any other host.
    """
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"{url}: only loopback addresses (127.0.0.0/8, ::1, localhost) allowed")
    return url.rstrip("/")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_server(model: str | None, backend: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``pneumoscan serve`` on a free loopback port, once ``/health`` says ready."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "pneumoscan",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if model:
        command += ["--model", model]
    command += ["--backend", backend]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise SystemExit(f"server not ready after {START_TIMEOUT_S:.0f} s; see {log}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


async def one_request(
    http: httpx.AsyncClient, url: str, payload: list[tuple[str, bytes]], tally: Tally
) -> None:
    files = [("files", (name, data, "image/jpeg")) for name, data in payload]
    started = time.perf_counter()
    try:
        response = await http.post(url, files=files)
    except httpx.HTTPError as exc:
        tally.error(type(exc).__name__)
        return
    if response.status_code != 200:
        tally.error(f"HTTP {response.status_code}")
        return
    tally.latencies.append(time.perf_counter() - started)
    for result in response.json()["results"]:
        tally.results[result["status"]] = tally.results.get(result["status"], 0) + 1


async def load(
    base: str,
    images: list[tuple[str, bytes]],
    args: argparse.Namespace,
) -> tuple[Tally, float, bool]:
    """Run the clients; returns the tally, the wall time and whether time ran out."""
    url = f"{base}/v1/predict?heatmap={'true' if args.heatmap else 'false'}"
    key = os.environ.get(API_KEY_ENV)
    headers = {"X-API-Key": key} if key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    tally = Tally()
    counter = iter(range(args.requests))
    deadline = time.monotonic() + args.max_seconds
    timed_out = False

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal timed_out
        for index in counter:
            if time.monotonic() > deadline:
                timed_out = True
                return
            tally.sent += 1
            payload = [
                images[(index * args.files_per_request + k) % len(images)]
                for k in range(args.files_per_request)
            ]
            await one_request(http, url, payload, tally)

    timeout = httpx.Timeout(args.timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as http:
        # Warm-up (not counted): the first heatmap loads matplotlib in the server.
        await one_request(http, url, images[:1], Tally())
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
        seconds = time.perf_counter() - started
    return tally, seconds, timed_out


def summarise(
    tally: Tally, seconds: float, args: argparse.Namespace, timed_out: bool
) -> dict[str, object]:
    latencies = np.asarray(tally.latencies) * 1000
    done = len(tally.latencies)
    percentiles = {
        f"p{q}_ms": float(np.percentile(latencies, q)) if done else None for q in (50, 95, 99)
    }
    return {
        "machine": machine(),
        "clients": args.clients,
        "requests": args.requests,
        "files_per_request": args.files_per_request,
        "heatmap": args.heatmap,
        "sent": tally.sent,
        "completed": done,
        "seconds": seconds,
        "requests_per_s": done / seconds if seconds > 0 else None,
        "images_per_s": done * args.files_per_request / seconds if seconds > 0 else None,
        **percentiles,
        "max_ms": float(latencies.max()) if done else None,
        "errors": tally.errors,
        "error_kinds": tally.error_kinds,
        "results": tally.results,
        "stopped_by_time_limit": timed_out,
    }


def report(summary: dict[str, object]) -> None:
    def ms(key: str) -> str:
        value = summary[key]
        return "n/a" if value is None else f"{value:.0f} ms"

    print(f"machine: {summary['machine']}; server: {summary['server']}")
    print(
        f"{summary['clients']} clients, {summary['completed']}/{summary['requests']} requests of "
        f"{summary['files_per_request']} X-ray(s), heatmap={summary['heatmap']}, "
        f"{summary['seconds']:.1f} s"
        + (" (stopped by the time limit)" if summary["stopped_by_time_limit"] else "")
    )
    rate = summary["requests_per_s"]
    print(
        f"throughput: {rate:.1f} requests/s ({summary['images_per_s']:.1f} images/s)"
        if rate
        else "throughput: n/a"
    )
    print(
        f"latency: p50 {ms('p50_ms')}, p95 {ms('p95_ms')}, p99 {ms('p99_ms')}, max {ms('max_ms')}"
    )
    print(f"errors: {summary['errors']} {summary['error_kinds'] or ''}".rstrip())
    print(f"results: {summary['results']}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=500, help="requests in all")
    parser.add_argument("--files-per-request", type=int, default=1)
    parser.add_argument("--heatmap", action="store_true", help="ask for Grad-CAM overlays")
    parser.add_argument("--url", help="a running server on loopback (default: start one)")
    parser.add_argument("--model", help="model for the server this script starts")
    parser.add_argument("--backend", default="keras", help="keras or onnx (server started here)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop issuing after this")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    if args.clients < 1 or args.requests < 1 or args.files_per_request < 1:
        parser.error("--clients, --requests and --files-per-request must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    images = [(p.name, p.read_bytes()) for p in xray_files()]
    process = None
    log = Path(tempfile.gettempdir()) / f"pneumoscan-serve-load-{os.getpid()}.log"
    if args.url:
        base = check_loopback(args.url)
    else:
        process, base = start_server(args.model, args.backend, log)
        print(f"started pneumoscan serve at {base} (log {log})")
    try:
        tally, seconds, timed_out = asyncio.run(load(base, images, args))
    finally:
        if process is not None:
            stop_server(process)
    summary = summarise(tally, seconds, args, timed_out)
    summary["server"] = f"started here ({args.backend})" if process is not None else base
    report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if process is not None and summary["errors"] == 0:
        log.unlink(missing_ok=True)  # keep the server's log only when something failed


if __name__ == "__main__":
    main()
