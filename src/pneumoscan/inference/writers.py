"""Results files: one small :class:`ResultWriter` protocol, one writer per format.

A writer takes :class:`~pneumoscan.inference.prediction.Prediction` records in input order and
knows one format only: CSV and JSON lines stream (one flushed line per prediction, so a killed
run keeps every line it wrote), JSON and Parquet are written whole, atomically, when the run
ends. Every writer has the same columns (:data:`~pneumoscan.inference.prediction.RESULT_FIELDS`)
and writes the rows of an earlier run it is given (``kept``) first. A new output (a DICOM SR, a
FHIR bundle) is one more class with ``write`` and ``close``.

Resuming is not a format's business: :func:`plan_resume` reads an earlier results file (any
format), checks that it is a pneumoscan results file, and says which inputs are done and which
rows stay; :func:`open_writer` refuses to replace an existing file unless told to.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pneumoscan.errors import InvalidInputError, OutputExistsError
from pneumoscan.inference.prediction import (
    FLOAT_FIELDS,
    RESULT_FIELDS,
    Prediction,
    printable_path,
)
from pneumoscan.jsonio import atomic_write, jsonable

#: Statuses a resumed run does not redo (errors are retried: the file may be readable now).
FINAL_STATUSES = frozenset({"ok", "rejected"})
#: Columns every pneumoscan results file has had, in every version.
_REQUIRED_COLUMNS = ("path", "status")


class ResultWriter(Protocol):
    """Where predictions go, one at a time, in input order."""

    path: Path

    def write(self, prediction: Prediction) -> None:
        """Add one prediction."""

    def close(self, complete: bool = True) -> None:
        """Finish the file; ``complete=False`` when the run stopped early (the file says so
        where its format can)."""


Row = dict[str, Any]


def _row(prediction: Prediction | Mapping[str, Any]) -> Row:
    """A prediction's row, or an earlier run's row with typed cells (a CSV's text read back:
    numbers as numbers, empty cells as none), so every writer holds one type per column."""
    if isinstance(prediction, Prediction):
        return prediction.as_row()
    return {key: _typed_cell(key, prediction.get(key)) for key in RESULT_FIELDS}


class _LineWriter:
    """A streamed text format: the kept rows are written atomically first, then each
    prediction is appended as one flushed line."""

    def __init__(self, path: str | Path, kept: Sequence[Mapping[str, Any]] = ()) -> None:
        self.path = Path(path)
        with (
            atomic_write(self.path) as partial,
            partial.open("w", encoding="utf-8", newline="") as handle,
        ):
            self._start(handle)
            for row in kept:
                self._line(handle, _row(row))
        self._handle = self.path.open("a", encoding="utf-8", newline="")

    def _start(self, handle: Any) -> None:
        """Write what comes before the first row."""

    def _line(self, handle: Any, row: Row) -> None:
        raise NotImplementedError

    def write(self, prediction: Prediction) -> None:
        self._line(self._handle, prediction.as_row())
        self._handle.flush()

    def close(self, complete: bool = True) -> None:
        self._handle.close()


class CsvWriter(_LineWriter):
    """Comma-separated values with a header line; empty cells for missing values."""

    def _start(self, handle: Any) -> None:
        csv.writer(handle, lineterminator="\n").writerow(RESULT_FIELDS)

    def _line(self, handle: Any, row: Row) -> None:
        csv.DictWriter(
            handle, fieldnames=RESULT_FIELDS, extrasaction="ignore", lineterminator="\n"
        ).writerow(row)


class JsonlWriter(_LineWriter):
    """JSON lines: one strict JSON object per line (NaN as ``null``)."""

    def _line(self, handle: Any, row: Row) -> None:
        handle.write(json.dumps(jsonable(row), allow_nan=False) + "\n")


class _WholeFileWriter:
    """A format written once, atomically, when the run ends."""

    def __init__(
        self,
        path: str | Path,
        kept: Sequence[Mapping[str, Any]] = (),
        about: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.about = dict(about or {})
        self.rows: list[Row] = [_row(row) for row in kept]

    def write(self, prediction: Prediction) -> None:
        self.rows.append(prediction.as_row())


class JsonWriter(_WholeFileWriter):
    """One JSON document: ``{"model": ..., "complete": bool, "results": [...]}`` (plus what
    ``about`` adds), written when the run ends."""

    def close(self, complete: bool = True) -> None:
        document = self.about | {"complete": complete, "results": self.rows}
        with atomic_write(self.path) as partial:
            partial.write_text(
                json.dumps(jsonable(document), indent=2, allow_nan=False) + "\n", encoding="utf-8"
            )


class ParquetWriter(_WholeFileWriter):
    """Apache Parquet (pyarrow), typed columns, written when the run ends; the file's
    metadata key ``pneumoscan`` holds ``about`` and ``complete``."""

    def close(self, complete: bool = True) -> None:
        import pyarrow as pa  # lazy: loads pyarrow
        import pyarrow.parquet as pq  # lazy: loads pyarrow

        schema = parquet_schema().with_metadata(
            {"pneumoscan": json.dumps(jsonable(self.about | {"complete": complete}))}
        )
        columns = {
            name: [_typed_cell(name, row.get(name)) for row in self.rows]
            for name in RESULT_FIELDS
        }
        table = pa.table(columns, schema=schema)
        with atomic_write(self.path) as partial:
            pq.write_table(table, partial)


def parquet_schema() -> Any:
    """The Parquet schema of a results file: floats, one boolean, text for the rest."""
    import pyarrow as pa  # lazy: loads pyarrow

    def kind(name: str) -> Any:
        if name in FLOAT_FIELDS:
            return pa.float64()
        return pa.bool_() if name == "near_threshold" else pa.string()

    return pa.schema([(name, kind(name)) for name in RESULT_FIELDS])


def _typed_cell(name: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    if name in FLOAT_FIELDS:
        number = float(value)
        return None if math.isnan(number) else number
    if name == "near_threshold":
        return value if isinstance(value, bool) else str(value).lower() == "true"
    return str(value)


#: Writers by file extension.
WRITERS: dict[str, type[CsvWriter | JsonlWriter | JsonWriter | ParquetWriter]] = {
    ".csv": CsvWriter,
    ".jsonl": JsonlWriter,
    ".ndjson": JsonlWriter,
    ".json": JsonWriter,
    ".parquet": ParquetWriter,
}
#: Formats that keep every row written before a crash (the ones ``--resume`` is for).
STREAMED = frozenset({".csv", ".jsonl", ".ndjson"})


def output_suffix(path: str | Path, allowed: Iterable[str] = WRITERS) -> str:
    """The results format of a file from its extension.

    Raises:
        InvalidInputError: An extension that is not one of ``allowed``.
    """
    suffix = Path(path).suffix.lower()
    allowed = tuple(allowed)
    if suffix not in allowed:
        raise InvalidInputError(
            f"{path}: a results file must end in {', '.join(allowed)} (its format)"
        )
    return suffix


def check_output(
    path: str | Path,
    *,
    overwrite: bool = False,
    resuming: bool = False,
    allowed: Iterable[str] = WRITERS,
) -> str:
    """Check that a results file may be written before any work starts; its extension.

    Raises:
        OutputExistsError: The file exists and neither ``overwrite`` nor ``resuming``.
        InvalidInputError: Unknown extension, the path is a folder, or ``resuming`` a format
            that is written whole (only .csv and .jsonl keep rows across a crash).
    """
    path = Path(path)
    suffix = output_suffix(path, allowed)
    if path.is_dir():
        raise InvalidInputError(f"{path}: a folder; give a file name for the results")
    if resuming and suffix not in STREAMED:
        raise InvalidInputError(
            f"{path}: --resume continues a streamed .csv or .jsonl file; {suffix} is written "
            "whole at the end of a run"
        )
    if path.exists() and not (overwrite or resuming):
        resume = "--resume to continue it, " if suffix in STREAMED else ""
        raise OutputExistsError(
            f"{path} already exists: pass {resume}--overwrite to replace it, or choose another "
            "file"
        )
    return suffix


def open_writer(
    path: str | Path,
    *,
    kept: Sequence[Mapping[str, Any]] = (),
    overwrite: bool = False,
    resuming: bool = False,
    about: Mapping[str, Any] | None = None,
    allowed: Iterable[str] = WRITERS,
) -> ResultWriter:
    """The writer for a file's format, holding ``kept`` rows first.

    Args:
        path: The results file; its extension picks the format.
        kept: Rows of an earlier run to write first (:func:`plan_resume`).
        overwrite: Replace an existing file.
        resuming: The file is being continued (``kept`` came from it).
        about: What a whole-file format records beside the rows (the model...).
        allowed: Extensions accepted here.

    Raises:
        OutputExistsError: The file exists and neither ``overwrite`` nor ``resuming``.
        InvalidInputError: Unknown extension, or the path is a folder.
    """
    path = Path(path)
    suffix = check_output(path, overwrite=overwrite, resuming=resuming, allowed=allowed)
    if suffix == ".json":
        return JsonWriter(path, kept, about)
    if suffix == ".parquet":
        return ParquetWriter(path, kept, about)
    return WRITERS[suffix](path, kept)


# --------------------------------------------------------------------------- reading back


def _complete_text(path: Path) -> str:
    """The file's text up to its last newline (a killed run may leave half a line)."""
    text = path.read_text(encoding="utf-8")
    return text[: text.rfind("\n") + 1]


def _check_columns(path: Path, columns: Iterable[str]) -> None:
    columns = list(columns)
    unknown = [c for c in columns if c not in RESULT_FIELDS]
    missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
    if unknown or missing:
        what = f"columns {unknown} are not pneumoscan's" if unknown else f"no {missing} column"
        raise InvalidInputError(
            f"{path}: not a pneumoscan results file ({what}); --resume continues only a file "
            "that `pneumoscan predict --out` wrote. Choose another --out file"
        )


def _read_rows(path: Path) -> list[Row]:
    suffix = output_suffix(path)
    rows: Any
    try:
        if suffix == ".csv":
            text = _complete_text(path)
            if not text:
                return []
            _check_columns(path, next(csv.reader(io.StringIO(text)), []))
            return [dict(row) for row in csv.DictReader(io.StringIO(text))]
        if suffix in (".jsonl", ".ndjson"):
            rows = [json.loads(line) for line in _complete_text(path).splitlines() if line.strip()]
        elif suffix == ".json":
            document = json.loads(path.read_text(encoding="utf-8"))
            rows = document.get("results") if isinstance(document, dict) else None
            if not isinstance(rows, list):
                raise InvalidInputError(f"{path}: not a pneumoscan results file (no results)")
        else:
            import pyarrow.parquet as pq  # lazy: loads pyarrow

            table = pq.read_table(path)
            _check_columns(path, table.column_names)
            rows = table.to_pylist()
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"{path}: not a pneumoscan results file ({exc})") from exc
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read it ({exc})") from exc
    for row in rows:
        if not isinstance(row, dict):
            raise InvalidInputError(f"{path}: not a pneumoscan results file (a row is no object)")
        _check_columns(path, row)
    return rows


def read_results(path: str | Path) -> list[Row]:
    """The rows of a results file of any format, one per path.

    A torn last line is ignored. Should a path appear more than once (a file written by an
    older version, whose ``--resume`` appended retried errors), its last row wins, at the place
    of its first.

    Raises:
        InvalidInputError: Not a pneumoscan results file (other columns, damaged).
    """
    latest: dict[str, Row] = {}
    for row in _read_rows(Path(path)):
        latest[str(row.get("path"))] = row
    return list(latest.values())


def completed_paths(path: str | Path) -> set[str]:
    """Inputs a resumed run can skip: those with an ``ok`` or ``rejected`` row."""
    return {r["path"] for r in read_results(path) if r.get("status") in FINAL_STATUSES}


@dataclass
class ResumePlan:
    """What a resumed run keeps of the earlier one.

    Attributes:
        done: Inputs (printable paths) with a final row: not scored again.
        kept: The earlier rows that stay, in their order: final rows, and rows of paths not
            among this run's inputs. Retried errors and re-listed problems get new rows.
    """

    done: set[str]
    kept: list[Row]


def plan_resume(path: str | Path, inputs: Iterable[str]) -> ResumePlan:
    """Which of ``inputs`` an earlier run at ``path`` finished, and which of its rows stay.

    A missing or empty file means nothing is done.

    Raises:
        InvalidInputError: The file is not a pneumoscan results file, or its format cannot be
            continued.
    """
    path = Path(path)
    output_suffix(path, STREAMED)
    if not path.exists() or path.stat().st_size == 0:
        return ResumePlan(set(), [])
    rows = read_results(path)
    done = {str(r["path"]) for r in rows if r.get("status") in FINAL_STATUSES}
    redo = {printable_path(item) for item in inputs} - done
    return ResumePlan(done, [row for row in rows if str(row.get("path")) not in redo])
