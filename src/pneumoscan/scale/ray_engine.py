"""Score an archive on a Ray cluster with Ray Data: ``pneumoscan predict --engine ray``.

Nothing here schedules work. Ray Data reads the files (:func:`ray.data.read_binary_files`), a
pool of actors scores them (``map_batches`` with :class:`BatchScorer`: one
:class:`~pneumoscan.inference.predictor.Predictor`, so one ONNX Runtime session, per actor), and
the driver writes the rows as they come back, in input order, through the writers local
``predict`` uses (:mod:`pneumoscan.inference.writers`: same columns, same formats). What keeps
a row identical to local ``predict``'s:

- Inputs are listed on the driver by :func:`~pneumoscan.inference.predict.list_inputs` (a
  manifest's paths too), so folders expand in the same order with the same problems (broken
  links, empty folders, missing paths), and files whose names start with ``.`` or ``_`` are
  scored (Ray's own folder listing skips them). A problem is an error row at its place.
- Files over the per-file cap are refused on the driver without being read, with the
  decoder's own message (:func:`~pneumoscan.data.preprocess.read_file`).
- Each actor decodes the bytes through the one decoder
  (:func:`~pneumoscan.data.preprocess.try_decode_image`: content sniffing, DICOM, pixel budget,
  deadline, firewall) and scores them with the local batch function
  (:meth:`~pneumoscan.inference.predictor.Predictor.predict_decoded`, which is
  :func:`~pneumoscan.inference.predict.predict_batch`). A file that cannot be decoded is an
  error row; nothing a file holds stops the job.

Paths go to the cluster as absolute paths (a worker's folder is not the driver's), so on a
real cluster the files and the model must be on storage every node mounts at the same path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.constants import DEFAULT_WORKERS
from pneumoscan.data.limits import max_file_bytes
from pneumoscan.data.preprocess import (
    DecodedImage,
    DecodeFailure,
    PreprocessConfig,
    read_file,
    try_decode_image,
)
from pneumoscan.errors import ImageReadError, InvalidInputError
from pneumoscan.inference import writers
from pneumoscan.inference.predict import (
    Entry,
    Problem,
    check_batching,
    decode_failed,
    list_inputs,
)
from pneumoscan.inference.prediction import ModelIdentity, Prediction, printable_path
from pneumoscan.inference.predictor import Predictor
from pneumoscan.models.modelfile import now_utc

#: What a user without the extra is told.
NEEDS_RAY = "--engine ray needs Ray Data: pip install 'pneumoscan[ray]'"
#: File types read as a manifest (a list of paths) when given as a source.
MANIFEST_SUFFIXES = (".parquet", ".csv")
#: The manifest column that holds the paths.
MANIFEST_COLUMN = "path"
#: Reading is I/O: read tasks take no CPU slot (the actors hold them), a few at a time.
READ_TASKS = 4


def require_ray() -> Any:
    """The ``ray`` module with Ray Data loaded.

    Raises:
        InvalidInputError: Ray Data is not installed (the ``ray`` extra).
    """
    try:
        import ray  # lazy: the ray extra is optional and slow to import
        import ray.data  # lazy: the ray extra is optional and slow to import
    except ImportError as exc:
        raise InvalidInputError(f"{NEEDS_RAY} ({exc})") from exc
    return ray


# --------------------------------------------------------------------------- inputs


def is_manifest(path: Path) -> bool:
    """Whether a source is a manifest: a ``.parquet`` or ``.csv`` file (a list of paths)."""
    return path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file()


def read_manifest(path: str | Path) -> list[str]:
    """The paths a manifest lists, in its order (its ``path`` column; relative paths are
    relative to the current folder, as on the command line).

    Raises:
        InvalidInputError: The file cannot be read or has no ``path`` column.
    """
    import pyarrow as pa  # lazy: loads pyarrow
    import pyarrow.csv as pa_csv  # lazy: loads pyarrow
    import pyarrow.parquet as pq  # lazy: loads pyarrow

    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            text_column = pa_csv.ConvertOptions(column_types={MANIFEST_COLUMN: pa.string()})
            table = pa_csv.read_csv(path, convert_options=text_column)
    except (OSError, pa.ArrowException) as exc:
        raise InvalidInputError(f"{path}: cannot read this manifest ({exc})") from exc
    if MANIFEST_COLUMN not in table.column_names:
        raise InvalidInputError(
            f"{path}: a manifest needs a {MANIFEST_COLUMN!r} column of file paths "
            f"(it has {', '.join(table.column_names) or 'no columns'})"
        )
    return ["" if p is None else str(p) for p in table.column(MANIFEST_COLUMN).to_pylist()]


def list_sources(sources: Sequence[str | os.PathLike[str]]) -> list[Entry]:
    """Every input in order, as local ``predict`` lists them, a manifest standing for its
    paths; files over the per-file cap become problems (refused unread, as the decoder would).
    """
    entries: list[Entry] = []
    for source in sources:
        path = Path(source)
        if not is_manifest(path):
            entries.extend(list_inputs([source]))
            continue
        for row, listed in enumerate(read_manifest(path), start=1):
            if listed.strip():
                entries.extend(list_inputs([listed]))
            else:
                entries.append(Problem(f"{path}:{row}", f"{path}: row {row} has an empty path"))
    cap = max_file_bytes()
    return [_refused_if_too_large(entry, cap) for entry in entries]


def _refused_if_too_large(entry: Entry, cap: int) -> Entry:
    if isinstance(entry, Problem):
        return entry
    try:
        if os.stat(entry).st_size <= cap:
            return entry
        read_file(entry)  # refuses before reading, with the decoder's own message
    except ImageReadError as exc:
        return Problem(entry, str(exc))
    except OSError:
        return entry  # gone since listing: the cluster finds it missing and says so
    return entry


# --------------------------------------------------------------------------- scoring


def decode_blobs(
    names: Sequence[str],
    blobs: Sequence[bytes],
    config: PreprocessConfig,
    pool: ThreadPoolExecutor | None = None,
) -> list[DecodedImage | DecodeFailure]:
    """Each file's bytes through the one decoder, named as its path (never raises)."""

    def decode(pair: tuple[str, bytes]) -> DecodedImage | DecodeFailure:
        return try_decode_image(bytes(pair[1]), config, name=pair[0])

    pairs = list(zip(names, blobs, strict=True))
    return list(pool.map(decode, pairs)) if pool is not None else [decode(p) for p in pairs]


def score_blobs(
    predictor: Predictor,
    names: Sequence[str],
    blobs: Sequence[bytes],
    *,
    ood_check: bool = True,
    pool: ThreadPoolExecutor | None = None,
) -> list[Prediction]:
    """One prediction per file's bytes, in order: decoded, then scored by the local batch
    function (:meth:`Predictor.predict_decoded`); a file that cannot be decoded is an error."""
    decoded = decode_blobs(names, blobs, predictor.model.preprocess, pool)
    good = [i for i, item in enumerate(decoded) if isinstance(item, DecodedImage)]
    scored = predictor.predict_decoded(
        [decoded[i] for i in good],  # type: ignore[misc]  # only DecodedImage at these places
        [names[i] for i in good],
        ood_check=ood_check,
    )
    results = dict(zip(good, scored, strict=True))
    now = now_utc()
    for i, item in enumerate(decoded):
        if isinstance(item, DecodeFailure):
            results[i] = decode_failed(names[i], item).traced(predictor.identity, now)
    return [results[i] for i in range(len(decoded))]


def predictions_table(predictions: Iterable[Prediction]) -> Any:
    """Predictions as an Arrow table with the results files' Parquet schema (so blocks from
    every actor share one schema, whatever their missing values)."""
    import pyarrow as pa  # lazy: loads pyarrow

    rows = [prediction.as_row() for prediction in predictions]
    return pa.Table.from_pylist(rows, schema=writers.parquet_schema())


@dataclass(frozen=True)
class ModelChoice:
    """How each actor opens the model (:meth:`Predictor.open`'s arguments, as absolute paths:
    an actor does not run in the driver's folder)."""

    model: str | None = None
    backend: str = "auto"
    onnx: str | None = None

    @classmethod
    def of(
        cls, model: str | Path | None, backend: str = "auto", onnx: str | Path | None = None
    ) -> ModelChoice:
        """The choice with its paths made absolute."""
        return cls(_absolute(model), backend, _absolute(onnx))

    def open(self) -> Predictor:
        """The model, opened."""
        return Predictor.open(self.model, self.backend, self.onnx)


def _absolute(path: str | Path | None) -> str | None:
    return None if path is None else os.path.abspath(path)


class BatchScorer:
    """The ``map_batches`` callable: one :class:`Predictor` per actor, opened once, scoring
    batches of ``{"path", "bytes"}`` rows into results rows.

    Args:
        choice: Which model to open.
        ood_check: Run the out-of-distribution checks.
        workers: Decoding threads within the actor (decoding overlaps nothing else here).
    """

    def __init__(
        self, choice: ModelChoice, ood_check: bool = True, workers: int = DEFAULT_WORKERS
    ) -> None:
        self.predictor = choice.open()
        self.ood_check = ood_check
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        names = [str(name) for name in batch["path"]]
        predictions = score_blobs(
            self.predictor, names, list(batch["bytes"]), ood_check=self.ood_check, pool=self.pool
        )
        return predictions_table(predictions)


# --------------------------------------------------------------------------- the job


def connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``) or,
    without one, the one ``RAY_ADDRESS`` names or a new local one; nothing if this process is
    already connected. Whether this call connected (and so should disconnect)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=True,
    )
    return True


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1)."""
    return max(1, int(require_ray().cluster_resources().get("CPU", 1)))


def stream_predictions(
    entries: Sequence[Entry],
    choice: ModelChoice,
    identity: ModelIdentity,
    *,
    actors: int | None = None,
    batch_size: int = 32,
    ood_check: bool = True,
    workers: int = DEFAULT_WORKERS,
) -> Iterator[Prediction]:
    """One prediction per entry, in the entries' order, scored on the connected cluster.

    Args:
        entries: Files and problems (:func:`list_sources`).
        choice: The model each actor opens.
        identity: The model's identity, recorded on the driver's own error rows.
        actors: Scoring actors (default: one per cluster CPU).
        batch_size: Images per ``map_batches`` batch.
        ood_check: Run the out-of-distribution checks.
        workers: Decoding threads per actor.
    """
    ray = require_ray()
    check_batching(batch_size, workers)
    files = [entry for entry in entries if isinstance(entry, str)]
    rows: Iterator[dict[str, Any]] = iter(())
    if files:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows come back in input order
        context.enable_progress_bars = False  # the driver shows its own, per image
        # Ray Data's execution log and its note that its bars are off, not the user's business.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        size = actors if actors is not None else cluster_cpus()
        dataset = ray.data.read_binary_files(
            [os.path.abspath(f) for f in files],
            include_paths=True,
            ignore_missing_paths=True,  # a file gone since listing becomes an error row here
            num_cpus=0,
            concurrency=READ_TASKS,
        ).map_batches(
            BatchScorer,
            fn_constructor_kwargs={"choice": choice, "ood_check": ood_check, "workers": workers},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=1,
        )
        rows = (
            row
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow")
            for row in table.to_pylist()
        )
    yield from _in_input_order(entries, rows, identity)


def _in_input_order(
    entries: Sequence[Entry], rows: Iterator[dict[str, Any]], identity: ModelIdentity
) -> Iterator[Prediction]:
    """The cluster's rows (files only, in order, absolute paths) merged with the problems,
    each named as it was given; a file with no row of its own is an error row."""
    waiting: dict[str, Any] | None = None
    for entry in entries:
        if isinstance(entry, Problem):
            yield Prediction.failed(entry.path, entry.message).traced(identity, now_utc())
            continue
        if waiting is None:
            waiting = next(rows, None)
        wanted = printable_path(os.path.abspath(entry))
        if waiting is not None and waiting["path"] == wanted:
            yield _named(Prediction.from_row(waiting), wanted, entry)
            waiting = None
        else:
            missing = f"{entry}: no such file (it went away before the cluster read it)"
            yield Prediction.failed(entry, missing).traced(identity, now_utc())


def _named(prediction: Prediction, absolute: str, given: str) -> Prediction:
    """A cluster's prediction named as the input was given (its messages too)."""

    def rename(text: str | None) -> str | None:
        if text is not None and text.startswith(absolute):
            return printable_path(given) + text[len(absolute) :]
        return text

    return prediction.replace(
        path=given, error=rename(prediction.error), reason=rename(prediction.reason)
    )


# --------------------------------------------------------------------------- with a file


def resume_plan(out: Path, names: Iterable[str]) -> writers.ResumePlan:
    """:func:`~pneumoscan.inference.writers.plan_resume` for any results format: a Ray run
    writes its Parquet file when it ends, interrupted or not, so it can be continued too."""
    if writers.output_suffix(out) in writers.STREAMED:
        return writers.plan_resume(out, names)
    if not out.exists() or out.stat().st_size == 0:
        return writers.ResumePlan(set(), [])
    rows = writers.read_results(out)
    done = {str(r["path"]) for r in rows if r.get("status") in writers.FINAL_STATUSES}
    redo = {printable_path(name) for name in names} - done
    return writers.ResumePlan(done, [row for row in rows if str(row.get("path")) not in redo])


@dataclass
class ArchiveRun:
    """What a Ray run did.

    Attributes:
        counts: Predictions per status in this run.
        done_before: Inputs a resumed run skipped.
        seconds: Wall time of the scoring (connecting included, the listing not).
        actors: Scoring actors used.
        predictions: This run's predictions (only when asked for).
    """

    counts: dict[str, int]
    done_before: int
    seconds: float
    actors: int
    predictions: list[Prediction] = field(default_factory=list)

    @property
    def scored(self) -> int:
        """Inputs this run wrote a row for."""
        return sum(self.counts.values())


def predict_archive(
    sources: Sequence[str | os.PathLike[str]],
    out: str | Path,
    *,
    model: str | Path | None = None,
    backend: str = "auto",
    onnx: str | Path | None = None,
    address: str | None = None,
    actors: int | None = None,
    batch_size: int = 32,
    ood_check: bool = True,
    workers: int = DEFAULT_WORKERS,
    resume: bool = False,
    overwrite: bool = False,
    on_start: Callable[[int, Predictor], None] | None = None,
    on_result: Callable[[Prediction], None] | None = None,
    keep: bool = False,
) -> ArchiveRun:
    """Score files, folders and manifests on a Ray cluster into a results file, one row per
    input in input order.

    Args:
        sources: Files, folders, and ``.parquet``/``.csv`` manifests with a ``path`` column.
        out: The results file (.parquet, .csv, .jsonl or .json).
        model, backend, onnx: The model, as :meth:`Predictor.open` takes it.
        address: The cluster to join (default: ``RAY_ADDRESS`` or a new local one).
        actors: Scoring actors (default: one per cluster CPU).
        batch_size: Images per batch.
        ood_check: Run the out-of-distribution checks.
        workers: Decoding threads per actor.
        resume: Skip inputs with an ``ok`` or ``rejected`` row in ``out`` (any format).
        overwrite: Replace an existing ``out``.
        on_start: Called with the number of inputs to score and the driver's predictor.
        on_result: Called with each prediction as it is written (progress).
        keep: Keep the predictions in the result.

    Raises:
        InvalidInputError: Ray missing, bad output name, or a resumed file that is not a
            pneumoscan results file.
        OutputExistsError: ``out`` exists and neither ``resume`` nor ``overwrite``.
    """
    out = Path(out)
    require_ray()
    streamed = writers.output_suffix(out) in writers.STREAMED
    # A Parquet (or JSON) file is continued by rewriting it whole, kept rows first.
    replace, resuming = overwrite or (resume and not streamed), resume and streamed
    writers.check_output(out, overwrite=replace, resuming=resuming)
    check_batching(batch_size, workers)
    entries = list_sources(sources)
    names = [printable_path(e.path if isinstance(e, Problem) else e) for e in entries]
    plan = resume_plan(out, names) if resume else writers.ResumePlan(set(), [])
    entries = [e for e, name in zip(entries, names, strict=True) if name not in plan.done]
    choice = ModelChoice.of(model, backend, onnx)
    predictor = choice.open()  # on the driver too: a bad model is one error before any job
    about = {"model": str(predictor.model.path), "model_info": predictor.describe()}
    started = time.perf_counter()
    # With nothing left to read (all done, or only problems) no cluster is needed.
    to_read = any(isinstance(entry, str) for entry in entries)
    connected = connect(address) if to_read else False
    used = (actors if actors is not None else cluster_cpus()) if to_read else 0
    if on_start is not None:
        on_start(len(entries), predictor)
    writer = writers.open_writer(
        out, kept=plan.kept, overwrite=replace, resuming=resuming, about=about
    )
    counts = {"ok": 0, "rejected": 0, "error": 0}
    kept: list[Prediction] = []
    complete = False
    try:
        for prediction in stream_predictions(
            entries, choice, predictor.identity, actors=used, batch_size=batch_size,
            ood_check=ood_check, workers=workers,
        ):  # fmt: skip
            writer.write(prediction)
            counts[prediction.status] += 1
            if keep:
                kept.append(prediction)
            if on_result is not None:
                on_result(prediction)
        complete = True
    finally:
        writer.close(complete=complete)  # an interrupted run keeps its rows: --resume goes on
        if connected:
            require_ray().shutdown()
    done = len(plan.done & set(names))
    return ArchiveRun(counts, done, time.perf_counter() - started, used, kept)
