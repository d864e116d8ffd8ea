"""`pneumoscan predict --engine ray`: the console side of scoring an archive on Ray Data
(:mod:`pneumoscan.scale.ray_engine` does the work)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pneumoscan.cli.common import _fail, stderr, stdout
from pneumoscan.errors import PneumoscanError
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
    written = [0]

    def start(total: int, predictor: Any) -> None:
        if predictor.note:
            stderr.print(predictor.note, highlight=False)
        advance.append(bars.enter_context(Reporter(stderr).task("predicting on ray", total)))

    def wrote(_: Any) -> None:
        written[0] += 1
        advance[0](1)

    with ExitStack() as bars:
        try:
            run = predict_archive(
                inputs, out, model=model, backend=backend, onnx=onnx, address=address,
                actors=actors, batch_size=batch_size, ood_check=ood_check, workers=workers,
                resume=resume, overwrite=overwrite, on_start=start, on_result=wrote,
            )  # fmt: skip
        except PneumoscanError:
            raise  # one error line, as for every command
        except Exception as exc:  # the cluster or an actor failed: say so, keep the rows
            first = (str(exc).strip().splitlines() or [""])[0]
            _fail(
                f"the Ray job failed after {written[0]} inputs: {type(exc).__name__}: {first}; "
                f"the rows so far are in {out} (continue with --resume --out {out})",
                code=1,
            )
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
