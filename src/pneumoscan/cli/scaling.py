"""`pneumoscan predict --engine ray`: the console side of scoring an archive on Ray Data
(:mod:`pneumoscan.scale.ray_engine` does the work)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pneumoscan.cli.common import _fail, stderr, stdout
from pneumoscan.progress import Reporter

#: Engines ``predict --engine`` takes.
ENGINES = ("local", "ray")


def check_engine(
    engine: str, out: Path | None, json_out: Path | None, heatmaps: Path | None
) -> None:
    """Refuse an unknown engine, and what the Ray engine does not do, before any work."""
    if engine not in ENGINES:
        _fail(f"unknown --engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "local":
        return
    if out is None:
        _fail("--engine ray needs --out FILE (.parquet, .csv, .jsonl or .json): an archive's "
              "results go to a file, not the console")  # fmt: skip
    if json_out is not None or heatmaps is not None:
        _fail("--engine ray writes --out only: --json and --heatmaps work with --engine local")


def predict_on_ray(
    inputs: list[Any],
    out: Path,
    *,
    model: Path | None,
    backend: str,
    onnx: Path | None,
    address: str | None,
    actors: int | None,
    batch_size: int,
    ood_check: bool,
    workers: int,
    resume: bool,
    overwrite: bool,
) -> None:
    """Score ``inputs`` (files, folders, manifests) on a Ray cluster into ``out``."""
    from pneumoscan.scale.ray_engine import predict_archive  # lazy: SciPy, and Ray on use

    advance: list[Callable[[int], None]] = []
    with ExitStack() as bars:

        def start(total: int, predictor: Any) -> None:
            if predictor.note:
                stderr.print(predictor.note, highlight=False)
            advance.append(bars.enter_context(Reporter(stderr).task("predicting on ray", total)))

        run = predict_archive(
            inputs, out, model=model, backend=backend, onnx=onnx, address=address,
            actors=actors, batch_size=batch_size, ood_check=ood_check, workers=workers,
            resume=resume, overwrite=overwrite, on_start=start,
            on_result=lambda _: advance[0](1),
        )  # fmt: skip
    counts = run.counts
    stdout.print(
        f"{counts['ok']} ok, {counts['rejected']} rejected (not a frontal chest X-ray), "
        f"{counts['error']} unreadable; {run.scored} inputs in {run.seconds:.1f} s "
        f"({run.scored / max(run.seconds, 1e-9):.1f} images/s on ray, {run.actors} actors)"
        + (f"; {run.done_before} done before" if resume else "")
        + f"; results in {out}",
        highlight=False,
    )
    if run.scored and counts["ok"] + counts["rejected"] + run.done_before == 0:
        _fail("no input could be read", code=1)
