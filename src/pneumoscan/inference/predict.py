"""Predict on files and folders; every file gets a result, readable or not.

The core is :func:`predict_batch`: a pure function from a batch of decoded images to results
(cheap checks, one forward pass, the fitted out-of-distribution check, the decision), so a
cluster engine (Ray Data ``map_batches``, a Spark pandas UDF) can map it over archived X-rays
unchanged. :func:`predict_files` wraps it for files: a threaded, prefetching decoder feeds it
batch by batch, and results come out in input order as soon as their batch is done, so a
caller can write them as they arrive (:class:`ResultWriter`) and resume a killed run.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pneumoscan.constants import CLASSES, DEFAULT_WORKERS, HEATMAP_MAX_SIDE, OOD_MEMBER
from pneumoscan.constants import VERSION as __version__
from pneumoscan.data.pipeline import DEFAULT_PREFETCH, iter_decoded
from pneumoscan.data.preprocess import DecodedImage, DecodeFailure
from pneumoscan.errors import InvalidInputError, OutputExistsError
from pneumoscan.inference.explain import gradcam, heatmap_title, overlay_png
from pneumoscan.inference.export import file_sha256
from pneumoscan.inference.ood import OodDetector, cheap_reasons
from pneumoscan.inference.scorer import AnyModel, OnnxModel, Scorer
from pneumoscan.jsonio import atomic_write
from pneumoscan.models.modelfile import LoadedModel, now_utc, read_member

if TYPE_CHECKING:
    import keras

#: Columns of the CSV output, and the keys a result may have.
RESULT_FIELDS = (
    "path",
    "status",
    "probability",
    "decision",
    "threshold",
    "ood_score",
    "reason",
    "error",
    "heatmap",
    "model_sha256",
    "pneumoscan_version",
    "scored_at",
)
#: Keys of :func:`model_provenance` and :func:`stamp` that every result carries.
PROVENANCE_FIELDS = ("model_sha256", "pneumoscan_version", "scored_at")
OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: Statuses a resumed run does not redo (errors are retried: the file may be readable now).
FINAL_STATUSES = frozenset({"ok", "rejected"})


#: Suffixes of image files: a sub-folder named like one is reported, not silently skipped.
_IMAGE_SUFFIXES = frozenset(
    {".jpeg", ".jpg", ".png", ".tif", ".tiff", ".dcm", ".dicom", ".bmp", ".webp", ".gif"}
)
_FILE_KINDS = {
    stat.S_ISFIFO: "a named pipe",
    stat.S_ISSOCK: "a socket",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
}


def expand_inputs(inputs: Sequence[str | Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """Files given plus every file under folders given (recursive, any extension).

    Symbolic links are followed, except one that leads back into a folder being walked.

    Returns:
        ``(files, problems)``: ``problems`` are error results for every path given or found
        that is not a readable file: missing paths, broken links, link loops, folders that
        cannot be listed, pipes and devices, empty sub-folders named like images, and folders
        given that hold no files.
    """
    files: list[str] = []
    problems: list[dict[str, Any]] = []
    for item in map(Path, inputs):
        kind = _entry_kind(item)
        if kind == "dir":
            found: list[str] = []
            _walk(item, found, problems, ancestors=frozenset())
            if not found and not any(p["path"].startswith(str(item)) for p in problems):
                problems.append(error_result(str(item), f"{item}: folder holds no files"))
            files.extend(sorted(found))
        elif kind == "file":
            files.append(str(item))
        else:
            problems.append(error_result(str(item), f"{item}: {kind}"))
    return files, problems


def _entry_kind(path: Path) -> str:
    """``file``, ``dir``, or why the path is neither (the reason an error result gives)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the link resolves to itself)"
        if path.is_symlink():
            return f"broken symbolic link (to {os.readlink(path)})"
        if exc.errno == errno.ENOENT:
            return "no such file or folder"
        return f"cannot read ({exc.strerror or type(exc).__name__}, {type(exc).__name__})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    for test, name in _FILE_KINDS.items():
        if test(mode):
            return f"not a regular file ({name})"
    return "not a regular file"


def _walk(
    folder: Path, files: list[str], problems: list[dict[str, Any]], ancestors: frozenset[Path]
) -> None:
    """Collect ``folder``'s files recursively; everything else found becomes a problem."""
    real = folder.resolve()
    if real in ancestors:
        problems.append(
            error_result(str(folder), f"{folder}: symbolic link loop (leads back to {real})")
        )
        return
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        reason = f"cannot list folder ({exc.strerror or exc}, {type(exc).__name__})"
        problems.append(error_result(str(folder), f"{folder}: {reason}"))
        return
    inside = ancestors | {real}
    for entry in entries:
        path = Path(entry.path)
        kind = _entry_kind(path)
        if kind == "file":
            files.append(str(path))
        elif kind == "dir":
            before = len(files), len(problems)
            _walk(path, files, problems, inside)
            if (len(files), len(problems)) == before and path.suffix.lower() in _IMAGE_SUFFIXES:
                # Named like an image, so probably meant as one: say why it gave no result.
                reason = "a folder, not an image file (it holds no files)"
                problems.append(error_result(str(path), f"{path}: {reason}"))
        else:
            problems.append(error_result(str(path), f"{path}: {kind}"))


def error_result(path: str, message: str) -> dict[str, Any]:
    """The result of a file that produced no probability."""
    return {"path": path, "status": "error", "error": message, "reason": message}


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def model_sha256(model: AnyModel) -> str | None:
    """SHA-256 of the model file scoring (cached per file, size and modification time).

    A temporary ONNX export (``--backend onnx`` without a saved one) is gone once loaded:
    its source ``.keras`` file's hash, recorded in the export, stands for it.
    """
    path = Path(model.path)
    try:
        info = path.stat()
    except OSError:
        return model.export_source_sha256
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    if key not in _SHA256_CACHE:
        _SHA256_CACHE[key] = file_sha256(path)
    return _SHA256_CACHE[key]


def model_provenance(model: AnyModel) -> dict[str, Any]:
    """What every result records about how it was made: ``model_sha256`` and
    ``pneumoscan_version`` (:func:`stamp` adds the time)."""

    return {"model_sha256": model_sha256(model), "pneumoscan_version": __version__}


def stamp(result: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the model's hash, the pneumoscan version and ``scored_at`` (now, UTC
    ISO 8601); keys the result already has are kept."""

    extra = provenance | {"scored_at": now_utc()}
    return result | {key: value for key, value in extra.items() if key not in result}


def decide(probability: float, threshold: float) -> str:
    """Class name for a probability at the model's operating threshold."""
    return CLASSES[1] if probability >= threshold else CLASSES[0]


def load_detector(model: AnyModel) -> OodDetector | None:
    """The model's fitted OOD detector, or ``None`` if ``pneumoscan fit-ood`` never ran on it."""
    if model.ood is None:
        return None
    data = model.ood_npz if isinstance(model, OnnxModel) else read_member(model.path, OOD_MEMBER)
    if data is None:
        return None
    return OodDetector.from_npz(data, model.ood_layers)


def make_scorer(model: AnyModel, detector: OodDetector | None, ood_check: bool = True) -> Scorer:
    """A scorer that also returns the features the detector needs (none if it needs none)."""
    layers = detector.layers if ood_check and detector is not None and detector.features else []
    return Scorer(model, layers)


def predict_batch(
    scorer: Scorer,
    pixels: np.ndarray,
    sizes: Sequence[tuple[int, int]] | np.ndarray | None = None,
    detector: OodDetector | None = None,
    ood_check: bool = True,
    display: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Results for a batch of decoded images, in order: the pure core of prediction.

    Images failing a cheap check are rejected before the model; the others go through one
    forward pass, then (if the model has one) the fitted OOD detector, then the decision.

    Args:
        scorer: The model on its backend.
        pixels: ``(n, H, W, 3)`` uint8 model input
        (:func:`pneumoscan.data.preprocess.decode_image`).
        sizes: ``(width, height)`` of each original image, for the aspect-ratio check.
        detector: The model's OOD detector, or ``None`` (cheap checks only).
        ood_check: ``False`` skips every check (``--no-ood-check``).
        display: The images before intensity normalisation, if the model uses one; the checks
            look at these.

    Returns:
        One dict per image without ``path``: ``status`` ``ok`` (``probability``,
        ``decision``, ``threshold``) or ``rejected`` (``reason``); ``ood_score`` whenever
        the fitted detector ran (above 1 means rejected).
    """
    view = pixels if display is None else display
    reasons: list[str | None] = [None] * len(pixels)
    if ood_check:
        reasons = cheap_reasons(view, sizes, polarity_check=detector is None)
    keep = [i for i, reason in enumerate(reasons) if reason is None]
    forward = scorer.forward(pixels[keep])
    probabilities = scorer.calibrate(forward.p_raw)
    assessed: list[tuple[float, str | None]] | None = None
    if ood_check and detector is not None and keep:
        assessed = detector.assess(view[keep], forward.features)
    threshold = scorer.model.threshold
    results: list[dict[str, Any]] = [{"status": "rejected", "reason": reason} for reason in reasons]
    for j, i in enumerate(keep):
        score, reason = assessed[j] if assessed is not None else (None, None)
        extra = {} if score is None else {"ood_score": round(score, 4)}
        if reason is not None:
            results[i] = {"status": "rejected", "reason": reason} | extra
            continue
        probability = float(probabilities[j])
        results[i] = {
            "status": "ok",
            "probability": round(probability, 6),
            "decision": decide(probability, threshold),
            "threshold": threshold,
        } | extra
    return results


def predict_decoded(
    scorer: Scorer,
    decoded: Sequence[DecodedImage],
    detector: OodDetector | None,
    ood_check: bool = True,
) -> list[dict[str, Any]]:
    """:func:`predict_batch` on decoded images (their pixels, original sizes and displays)."""
    return predict_batch(
        scorer,
        np.stack([d.pixels for d in decoded]),
        [d.original_size for d in decoded],
        detector,
        ood_check,
        np.stack([d.display for d in decoded]),
    )


def heatmap_file(directory: Path, path: str) -> Path:
    """Overlay file for an input: its stem plus a hash of its path (names repeat in folders)."""
    digest = hashlib.sha1(path.encode("utf-8"), usedforsecurity=False).hexdigest()[:8]
    return directory / f"{Path(path).stem}-{digest}.png"


def display_at_original_aspect(
    decoded: DecodedImage, max_side: int = HEATMAP_MAX_SIDE
) -> np.ndarray:
    """The decoded image stretched back to its original aspect ratio, at most ``max_side``
    pixels on its longer side (for overlays and previews)."""
    width, height = decoded.original_size
    scale = min(1.0, max_side / max(width, height, 1))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(decoded.display)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image)


def write_heatmaps(
    network: keras.Model,
    decoded: Sequence[DecodedImage],
    results: Sequence[dict[str, Any]],
    paths: Sequence[str],
    directory: Path,
) -> None:
    """Write a Grad-CAM overlay for each ``ok`` result and record its file in the result."""

    chosen = [i for i, result in enumerate(results) if result["status"] == "ok"]
    if not chosen:
        return
    # Each map shows the evidence for the image's own decision (a NORMAL image has no
    # pneumonia evidence to show, so its pneumonia map would be empty).
    classes = [CLASSES.index(results[i]["decision"]) for i in chosen]
    maps = gradcam(network, np.stack([decoded[i].pixels for i in chosen]), class_index=classes)
    for heatmap, i in zip(maps, chosen, strict=True):
        result = results[i]
        title = heatmap_title(Path(paths[i]).name, result["probability"], result["decision"])
        target = heatmap_file(directory, paths[i])
        overlay_png(display_at_original_aspect(decoded[i]), heatmap, title, target)
        result["heatmap"] = str(target)


def predict_files(
    model: AnyModel,
    files: Sequence[str],
    batch_size: int = 32,
    *,
    ood_check: bool = True,
    heatmaps: str | Path | None = None,
    heatmap_network: keras.Model | None = None,
    workers: int = DEFAULT_WORKERS,
    prefetch: int = DEFAULT_PREFETCH,
    scorer: Scorer | None = None,
    detector: OodDetector | None = None,
    provenance: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """One result per file, in order, streamed as batches finish; bad files never stop it.

    Args:
        model: Keras or ONNX Runtime model.
        files: Paths to score.
        batch_size: Images decoded and scored at a time.
        ood_check: Run the cheap checks and the model's OOD detector.
        heatmaps: Folder for Grad-CAM overlays of accepted images (``None``: none).
        heatmap_network: Keras network for the heatmaps (default: the model's, if Keras).
        workers: Decoding threads.
        prefetch: Batches decoded ahead.
        scorer: Reuse a scorer (default: built for ``model`` and its detector).
        detector: The OOD detector (default: the model's own, if fitted).
        provenance: What each result records of the model (default:
            :func:`model_provenance`); every result also gets ``scored_at``.
    """
    provenance = model_provenance(model) if provenance is None else provenance
    if detector is None and ood_check:
        detector = load_detector(model)
    scorer = scorer or make_scorer(model, detector, ood_check)
    directory = Path(heatmaps) if heatmaps is not None else None
    if directory is not None and heatmap_network is None:
        if not isinstance(model, LoadedModel):
            raise InvalidInputError("heatmaps need the Keras model (Grad-CAM needs gradients)")
        heatmap_network = model.network
    for start, items in iter_decoded(files, model.preprocess, batch_size, workers, prefetch):
        decoded = [item for item in items if isinstance(item, DecodedImage)]
        positions = [start + i for i, item in enumerate(items) if isinstance(item, DecodedImage)]
        scored: dict[int, dict[str, Any]] = {}
        if decoded:
            results = predict_decoded(scorer, decoded, detector, ood_check)
            names = [files[p] for p in positions]
            if directory is not None and heatmap_network is not None:
                write_heatmaps(heatmap_network, decoded, results, names, directory)
            scored = dict(zip(positions, results, strict=True))
        for offset, item in enumerate(items):
            position = start + offset
            if isinstance(item, DecodeFailure):
                yield stamp(error_result(files[position], item.message), provenance)
            else:
                yield stamp({"path": files[position]} | scored[position], provenance)


def output_format(path: str | Path) -> str:
    """``csv`` or ``jsonl`` from the file's extension.

    Raises:
        ValueError: Another extension.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InvalidInputError(f"{path}: use a .csv or .jsonl file for streamed results")
    return OUTPUT_FORMATS[suffix]


def _complete_text(path: Path) -> str:
    """The file's text up to its last newline (a killed run may leave half a line)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return text[: text.rfind("\n") + 1]


def _parse_results(path: Path, text: str) -> list[dict[str, Any]]:
    if not text:
        return []
    if output_format(path) == "jsonl":
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:  # a damaged results file is the user's to fix
            raise InvalidInputError(str(exc)) from exc
    return [dict(row) for row in csv.DictReader(io.StringIO(text))]


def _csv_header(text: str) -> list[str]:
    """The column names on a CSV text's first line."""
    return next(csv.reader(io.StringIO(text)), [])


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Results already written to a CSV or JSON lines file, one per path.

    A torn last line is ignored. Should a path appear more than once (a file written by an
    older version, whose ``--resume`` appended retried errors), its last result wins, at the
    place of its first.
    """
    path = Path(path)
    latest: dict[str, dict[str, Any]] = {}
    for row in _parse_results(path, _complete_text(path)):
        latest[str(row.get("path"))] = row
    return list(latest.values())


def completed_paths(path: str | Path) -> set[str]:
    """Inputs a resumed run can skip: those with an ``ok`` or ``rejected`` result."""
    return {r["path"] for r in read_results(path) if r.get("status") in FINAL_STATUSES}


class ResultWriter:
    """Append results to a CSV or JSON lines file, one flushed line per result.

    A killed run keeps every line it wrote; with ``resume`` the file is extended (a torn last
    line is cut first), otherwise an existing non-empty file is refused.

    Raises:
        FileExistsError: The file exists, is not empty, and ``resume`` is false.
        ValueError: Unsupported extension.
    """

    def __init__(self, path: str | Path, resume: bool = False) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        if self.path.exists() and self.path.stat().st_size > 0 and not resume:
            raise OutputExistsError(
                f"{self.path} already exists: use --resume to continue it, or remove it"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        complete = _complete_text(self.path)
        if self.path.exists() and len(complete.encode("utf-8")) != self.path.stat().st_size:
            self.path.write_text(complete, encoding="utf-8")
        self._handle = self.path.open("a", encoding="utf-8", newline="")
        self._csv: csv.DictWriter[str] | None = None
        self._open_writer(self._handle, header=not complete)
        if self.format == "csv" and complete and _csv_header(complete) != list(RESULT_FIELDS):
            # Written by a version with other columns: rewrite it with today's header (the
            # missing cells stay empty), so appended rows line up with their columns.
            self._rewrite(_parse_results(self.path, complete))

    def forget(self, paths: Iterable[str]) -> int:
        """Remove the rows of ``paths`` (results about to be redone), keeping every other row.

        The file is rewritten beside itself and swapped in, so a crash leaves either the old
        or the new file, never half of one.

        Returns:
            How many rows were removed.
        """
        drop = set(paths)
        text = _complete_text(self.path)
        rows = _parse_results(self.path, text)
        keep = [row for row in rows if row.get("path") not in drop]
        if len(keep) == len(rows):
            return 0
        self._rewrite(keep)
        return len(rows) - len(keep)

    def _rewrite(self, keep: Sequence[dict[str, Any]]) -> None:
        """Replace the file by ``keep``'s rows, atomically, and go on appending to it."""
        self._handle.close()
        with (
            atomic_write(self.path) as partial,
            partial.open("w", encoding="utf-8", newline="") as handle,
        ):
            self._open_writer(handle, header=True)
            for row in keep:
                self._write_row(handle, row)
        self._handle = self.path.open("a", encoding="utf-8", newline="")
        self._open_writer(self._handle, header=False)

    def _open_writer(self, handle: Any, header: bool) -> None:
        self._csv = None
        if self.format == "csv":
            self._csv = csv.DictWriter(
                handle, fieldnames=RESULT_FIELDS, extrasaction="ignore", lineterminator="\n"
            )
            if header:
                self._csv.writeheader()

    def _write_row(self, handle: Any, result: dict[str, Any]) -> None:
        if self._csv is not None:
            self._csv.writerow(result)
        else:
            handle.write(json.dumps(result, allow_nan=False) + "\n")

    def write(self, result: dict[str, Any]) -> None:
        """Append one result and flush it to the file."""
        self._write_row(self._handle, result)
        self._handle.flush()

    def close(self) -> None:
        """Close the file."""
        self._handle.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Count of results per status."""
    counts = {"ok": 0, "rejected": 0, "error": 0}
    for result in results:
        counts[result["status"]] = counts.get(result["status"], 0) + 1
    return counts
