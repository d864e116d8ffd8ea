"""Throughput of `predict --engine ray` with 1 and 2 actors, against local `predict`.

Usage:
    python benchmarks/ray_scaling.py [FOLDER] [--limit 2000] [--actors 1 2] [--cpus 2]
        [--rounds 1]

Scores the first ``--limit`` files of FOLDER (default: the shared training images) with local
``predict`` (:meth:`Predictor.predict_files`, what ``pneumoscan predict`` runs) and then on a
local Ray cluster of ``--cpus`` CPUs (``ray.init``, started once, not timed) through
:func:`pneumoscan.scale.ray_engine.predict_archive` (what ``--engine ray`` runs: listing,
reading, decoding and scoring in actors, rows back in input order, Parquet written), once per
actor count. For each it prints:

- end to end images/s (actors starting and opening the model included),
- the start-up: the wall time beyond what the steady rate explains (actors starting and
  opening the model, the pipeline filling),
- the steady rate (over the second half of the rows), and that rate per actor,
- the per-image overhead against local predict: ``1/steady - 1/local`` in milliseconds,
- the cost of 1 million images at the steady per-actor rate, in actor-hours,
- CPU seconds per image: this process and every process it started (the local Ray cluster:
  its actors, read tasks, raylet and GCS), read from ``/proc``. On a machine shared with other
  work this is the figure to compare: wall-clock rates there depend on how many runnable
  threads each side has against the others' (the 1-minute load average is printed beside
  each).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from common import SHARED_DATA, machine

from pneumoscan.inference.predict import expand_inputs
from pneumoscan.inference.predictor import Predictor
from pneumoscan.scale.ray_engine import predict_archive

MILLION = 1_000_000
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[int, float]:
    """User and system CPU seconds of this process and each of its descendants now alive."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        fields = text[text.rindex(")") + 2 :].split()  # after the command name
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
    mine = {os.getpid()}
    grew = True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in mine} - mine
        mine |= found
        grew = bool(found)
    return {pid: used[pid] for pid in mine if pid in used}


class CpuTracker:
    """CPU seconds spent by this process and its descendants while it runs: ``/proc`` is read
    every half second on a thread, so a Ray worker that ends before the run does (an actor
    shut down with its operator, an idle worker reaped) still counts up to its last reading."""

    def __init__(self) -> None:
        self.first = cpu_seconds()
        self.last = dict(self.first)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            self.last.update(cpu_seconds())

    def spent(self) -> float:
        """Stop watching; the CPU seconds spent since the tracker started."""
        self._done.set()
        self._thread.join()
        self.last.update(cpu_seconds())
        return sum(seconds - self.first.get(pid, 0.0) for pid, seconds in self.last.items())


def local_rate(files: list[str]) -> tuple[float, float]:
    """Images/s and CPU seconds per image of local predict over ``files`` (model opened
    outside the timing)."""
    predictor = Predictor.open()
    started, cpu = time.perf_counter(), CpuTracker()
    count = sum(1 for _ in predictor.predict_files(files))
    return count / (time.perf_counter() - started), cpu.spent() / count


def ray_run(files: list[str], actors: int, out: Path) -> dict[str, float]:
    """End-to-end, start-up and steady figures of one Ray run over ``files``."""
    arrivals: list[float] = []
    started, cpu = time.perf_counter(), CpuTracker()
    predict_archive(
        files, out, actors=actors, overwrite=True,
        on_result=lambda _: arrivals.append(time.perf_counter()),
    )  # fmt: skip
    ended, spent = time.perf_counter(), cpu.spent()
    # Rows come back in input order while actors work ahead of it, so the first rows arrive
    # in a burst: the steady rate is that of the second half of the rows.
    half = len(arrivals) // 2
    steady = (len(arrivals) - half) / max(ended - arrivals[half], 1e-9)
    return {
        "end_to_end": len(arrivals) / (ended - started),
        "startup": (ended - started) - len(arrivals) / steady,
        "steady": steady,
        "per_actor": steady / actors,
        "cpu_per_image": spent / len(arrivals),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", default=str(SHARED_DATA / "chest_xray" / "train"))
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    import ray  # the ray extra

    files, _ = expand_inputs([args.folder])
    files = files[: args.limit]
    print(f"{machine()}; {len(files)} files of {args.folder}; Ray {ray.__version__}")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    out = Path(tempfile.mkdtemp(prefix="pneumoscan-ray-")) / "results.parquet"
    for round_ in range(1, args.rounds + 1):
        load = os.getloadavg()[0]
        local, local_cpu = local_rate(files)
        print(
            f"round {round_} local predict: {local:6.1f} images/s, "
            f"{1000 * local_cpu:.2f} CPU ms/image (load {load:.1f})"
        )
        for actors in args.actors:
            load = os.getloadavg()[0]
            figures = ray_run(files, actors, out)
            overhead_ms = 1000 * (1 / figures["steady"] - 1 / local)
            actor_hours = MILLION / figures["per_actor"] / 3600
            print(
                f"round {round_} ray, {actors} actor{'s' * (actors > 1)}: "
                f"{figures['end_to_end']:6.1f} images/s end to end, "
                f"start-up {figures['startup']:.1f} s, steady {figures['steady']:6.1f} images/s "
                f"({figures['per_actor']:.1f} per actor); overhead {overhead_ms:+.2f} ms/image "
                f"against local; 1M images = {actor_hours:.1f} actor-hours; "
                f"{1000 * figures['cpu_per_image']:.2f} CPU ms/image "
                f"({1000 * (figures['cpu_per_image'] - local_cpu):+.2f} against local) "
                f"(load {load:.1f})"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
