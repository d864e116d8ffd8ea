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


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two :func:`cpu_seconds` readings by the processes alive at
    the second (a process that ended in between is not counted: Ray keeps its workers)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def local_rate(files: list[str]) -> tuple[float, float]:
    """Images/s and CPU seconds per image of local predict over ``files`` (model opened
    outside the timing)."""
    predictor = Predictor.open()
    started, cpu = time.perf_counter(), cpu_seconds()
    count = sum(1 for _ in predictor.predict_files(files))
    return count / (time.perf_counter() - started), cpu_spent(cpu, cpu_seconds()) / count


def ray_run(files: list[str], actors: int, out: Path) -> dict[str, float]:
    """End-to-end, start-up and steady figures of one Ray run over ``files``."""
    arrivals: list[float] = []
    cpu = [cpu_seconds()]

    def arrived(_: object) -> None:
        arrivals.append(time.perf_counter())
        if len(arrivals) == len(files):  # the actors are still alive: count their CPU
            cpu.append(cpu_seconds())

    started = time.perf_counter()
    predict_archive(files, out, actors=actors, overwrite=True, on_result=arrived)
    ended = time.perf_counter()
    # Rows come back in input order while actors work ahead of it, so the first rows arrive
    # in a burst: the steady rate is that of the second half of the rows.
    half = len(arrivals) // 2
    steady = (len(arrivals) - half) / max(ended - arrivals[half], 1e-9)
    return {
        "end_to_end": len(arrivals) / (ended - started),
        "startup": (ended - started) - len(arrivals) / steady,
        "steady": steady,
        "per_actor": steady / actors,
        "cpu_per_image": cpu_spent(cpu[0], cpu[-1]) / len(arrivals),
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
