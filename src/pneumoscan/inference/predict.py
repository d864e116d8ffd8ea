"""Predict on files and folders; every input gets one :class:`Prediction`, in input order.

The core is :func:`predict_batch`: a pure function from a batch of decoded images to
predictions (cheap checks, one forward pass, the fitted out-of-distribution check, the
decision), so a cluster engine (Ray Data ``map_batches``, a Spark pandas UDF) can map it over
archived X-rays unchanged. :func:`predict_files` wraps it for files: a threaded, prefetching
decoder feeds it batch by batch, and predictions come out in input order as soon as their batch
is done, so a caller can write them as they arrive (:mod:`pneumoscan.inference.writers`).
:class:`pneumoscan.inference.predictor.Predictor` puts the parts together once for every caller.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pneumoscan.constants import CLASSES, DEFAULT_WORKERS, HEATMAP_MAX_SIDE, OOD_MEMBER
from pneumoscan.data.pipeline import DEFAULT_PREFETCH, iter_decoded
from pneumoscan.data.preprocess import DecodedImage, DecodeFailure
from pneumoscan.errors import InvalidInputError
from pneumoscan.inference.explain import gradcam, heatmap_title, overlay_png
from pneumoscan.inference.export import file_sha256
from pneumoscan.inference.ood import OodDetector, cheap_reasons
from pneumoscan.inference.prediction import ModelIdentity, Prediction
from pneumoscan.inference.scorer import AnyModel, OnnxModel, Scorer
from pneumoscan.models.modelfile import now_utc, read_member

if TYPE_CHECKING:
    import keras

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


@dataclass(frozen=True)
class Problem:
    """An input path that is not a readable file, and why (it becomes an error row)."""

    path: str
    message: str


#: One input after expansion: a file to decode, or a problem to report, in input order.
Entry = str | Problem


def list_inputs(inputs: Sequence[str | bytes | os.PathLike[Any]]) -> list[Entry]:
    """Every input in the order given: files as given, each folder's files and problems
    (recursive, any extension) in path order at the folder's place.

    Symbolic links are followed, except one that leads back into a folder being walked.
    Paths may be ``str``, ``bytes`` (a file name that is not UTF-8) or path objects. A
    problem is any path given or found that is not a readable file: missing paths, broken
    links, link loops, folders that cannot be listed, pipes and devices, paths longer than
    the OS allows, empty sub-folders named like images, and folders given that hold no files.
    """
    entries: list[Entry] = []
    for given in inputs:
        item = Path(os.fsdecode(given))
        kind = _entry_kind(item)
        if kind == "dir":
            found: list[Entry] = []
            _walk(item, found, ancestors=frozenset())
            if not found:
                found.append(Problem(str(item), f"{item}: folder holds no files"))
            entries.extend(sorted(found, key=_entry_path))
        elif kind == "file":
            entries.append(str(item))
        else:
            entries.append(Problem(str(item), f"{item}: {kind}"))
    return entries


def _entry_path(entry: Entry) -> str:
    return entry if isinstance(entry, str) else entry.path


def expand_inputs(
    inputs: Sequence[str | bytes | os.PathLike[Any]],
) -> tuple[list[str], list[dict[str, Any]]]:
    """:func:`list_inputs` split into ``(files, problems)`` (problems as error dicts with
    ``path``, ``status``, ``error`` and ``reason``), for callers that only need the files."""
    entries = list_inputs(inputs)
    files = [entry for entry in entries if isinstance(entry, str)]
    problems = [
        Prediction.failed(entry.path, entry.message).as_row()
        for entry in entries
        if isinstance(entry, Problem)
    ]
    return files, problems


def _entry_kind(path: Path) -> str:
    """``file``, ``dir``, or why the path is neither (the reason an error result gives)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the link resolves to itself)"
        if exc.errno == errno.ENAMETOOLONG:
            return "path longer than the operating system allows (File name too long)"
        try:
            if path.is_symlink():
                return f"broken symbolic link (to {os.readlink(path)})"
        except OSError:
            pass  # the link itself cannot be read either: report the first error
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


def _walk(folder: Path, found: list[Entry], ancestors: frozenset[Path]) -> None:
    """Collect ``folder``'s files and problems recursively."""
    real = folder.resolve()
    if real in ancestors:
        found.append(Problem(str(folder), f"{folder}: symbolic link loop (leads back to {real})"))
        return
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        reason = f"cannot list folder ({exc.strerror or exc}, {type(exc).__name__})"
        found.append(Problem(str(folder), f"{folder}: {reason}"))
        return
    inside = ancestors | {real}
    for entry in entries:
        path = Path(entry.path)
        kind = _entry_kind(path)
        if kind == "file":
            found.append(str(path))
        elif kind == "dir":
            before = len(found)
            _walk(path, found, inside)
            if len(found) == before and path.suffix.lower() in _IMAGE_SUFFIXES:
                # Named like an image, so probably meant as one: say why it gave no result.
                reason = "a folder, not an image file (it holds no files)"
                found.append(Problem(str(path), f"{path}: {reason}"))
        else:
            found.append(Problem(str(path), f"{path}: {kind}"))


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


def model_identity(model: AnyModel) -> ModelIdentity:
    """What every prediction records about the model that made it."""
    return ModelIdentity(
        name=model.name,
        path=str(model.path),
        backend="onnx" if isinstance(model, OnnxModel) else "keras",
        threshold=model.threshold,
        model_sha256=model_sha256(model),
    )


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
) -> list[Prediction]:
    """Predictions for a batch of decoded images, in order: the pure core of prediction.

    Images failing a cheap check are rejected before the model; the others go through one
    forward pass, then (if the model has one) the fitted OOD detector, then the decision.

    Args:
        scorer: The model on its backend.
        pixels: ``(n, H, W, 3)`` uint8 model input
            (:func:`pneumoscan.data.preprocess.decode_image`).
        sizes: ``(width, height)`` of each original image, for the aspect-ratio check.
        detector: The model's OOD detector, or ``None`` (cheap checks only).
        ood_check: ``False`` scores every image; the cheap checks still run, and what they
            would have rejected is named in ``warning``.
        display: The images before intensity normalisation, if the model uses one; the checks
            look at these.

    Returns:
        One :class:`Prediction` per image with an empty ``path``: ``ok`` (``probability``,
        ``decision``, ``threshold``...) or ``rejected`` (``reason``); ``ood_score`` whenever
        the fitted detector ran (above 1 means rejected).
    """
    view = pixels if display is None else display
    cheap = cheap_reasons(view, sizes, polarity_check=detector is None or not ood_check)
    reasons = cheap if ood_check else [None] * len(pixels)
    keep = [i for i, reason in enumerate(reasons) if reason is None]
    forward = scorer.forward(pixels[keep])
    probabilities = scorer.calibrate(forward.p_raw)
    assessed: list[tuple[float, str | None]] | None = None
    if ood_check and detector is not None and keep:
        assessed = detector.assess(view[keep], forward.features)
    threshold = scorer.model.threshold
    results = [
        Prediction(path="", status="rejected", reason=reason, threshold=threshold)
        for reason in reasons
    ]
    for j, i in enumerate(keep):
        score, reason = assessed[j] if assessed is not None else (None, None)
        if reason is not None:
            results[i] = results[i].replace(reason=reason, ood_score=score)
            continue
        scored = Prediction.scored(float(probabilities[j]), threshold, score)
        if forward.p_viral is not None and scorer.subtype is not None:
            p_viral = float(forward.p_viral[j])
            scored = scored.with_subtype(p_viral, scorer.subtype.call(p_viral))
        results[i] = scored if ood_check else scored.replace(warning=cheap[i])
    return results


def predict_decoded(
    scorer: Scorer,
    decoded: Sequence[DecodedImage],
    detector: OodDetector | None,
    ood_check: bool = True,
) -> list[Prediction]:
    """:func:`predict_batch` on decoded images (their pixels, original sizes and displays),
    with the DICOM header's part (:func:`with_dicom_headers`)."""

    def score(fit: Sequence[DecodedImage]) -> list[Prediction]:
        return predict_batch(
            scorer,
            np.stack([d.pixels for d in fit]),
            [d.original_size for d in fit],
            detector,
            ood_check,
            displays(fit),
        )

    return with_dicom_headers(decoded, score, scorer.model.threshold)


def displays(decoded: Sequence[DecodedImage]) -> np.ndarray | None:
    """The images before intensity normalisation, stacked; ``None`` when they are the model
    inputs themselves (no normalisation: a second copy of the batch would be wasted)."""
    if all(d.display is d.pixels for d in decoded):
        return None
    return np.stack([d.display for d in decoded])


def decode_failed(path: str, failure: DecodeFailure) -> Prediction:
    """The error prediction of a file that could not be decoded; a DICOM file whose header
    was read keeps its identifiers."""
    failed = Prediction.failed(path, failure.message)
    return failed if failure.dicom is None else failed.replace(**failure.dicom.identifiers())


def with_dicom_headers(
    decoded: Sequence[DecodedImage],
    score: Callable[[Sequence[DecodedImage]], list[Prediction]],
    threshold: float,
) -> list[Prediction]:
    """Predictions for decoded images, in order, where DICOM headers have their say.

    A DICOM image the series rules refuse (:mod:`pneumoscan.data.selection`: not DX or CR, a
    body part other than the chest, a lateral view, a "for processing" image) is ``rejected``
    with the rule's reason and never scored, whatever ``ood_check`` says (as ``pneumoscan
    pacs`` refuses it); the others go to ``score`` in one batch. Every prediction of a DICOM
    image carries its identifiers (study, series and SOP instance UIDs, accession number,
    patient id).
    """
    if not decoded:
        return []
    refused = [d.dicom is not None and d.dicom.refusal is not None for d in decoded]
    fit = [d for d, no in zip(decoded, refused, strict=True) if not no]
    scored = iter(score(fit) if fit else [])
    results: list[Prediction] = []
    for image, no in zip(decoded, refused, strict=True):
        header = image.dicom
        if header is not None and no:
            result = Prediction(
                path="", status="rejected", reason=header.refusal, threshold=threshold
            )
        else:
            result = next(scored)
        if header is not None:
            result = result.replace(**header.identifiers())
        results.append(result)
    return results


def heatmap_file(directory: Path, path: str) -> Path:
    """Overlay file for an input: its stem plus a hash of its path (names repeat in folders)."""
    digest = hashlib.sha1(os.fsencode(path), usedforsecurity=False).hexdigest()[:8]
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
    results: Sequence[Prediction],
    paths: Sequence[str],
    directory: Path,
) -> list[Prediction]:
    """Write a Grad-CAM overlay for each ``ok`` prediction; the predictions with their files."""

    chosen = [i for i, result in enumerate(results) if result.status == "ok"]
    updated = list(results)
    if not chosen:
        return updated
    # Each map shows the evidence for the image's own decision (a NORMAL image has no
    # pneumonia evidence to show, so its pneumonia map would be empty).
    classes = [CLASSES.index(str(results[i].decision)) for i in chosen]
    maps = gradcam(network, np.stack([decoded[i].pixels for i in chosen]), class_index=classes)
    for heatmap, i in zip(maps, chosen, strict=True):
        title = heatmap_title(Path(paths[i]).name, results[i])
        target = heatmap_file(directory, paths[i])
        overlay_png(display_at_original_aspect(decoded[i]), heatmap, title, target)
        updated[i] = results[i].replace(heatmap=str(target))
    return updated


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
    identity: ModelIdentity | None = None,
) -> Iterator[Prediction]:
    """One prediction per file, in order, streamed as batches finish; bad files never stop it.

    Args:
        model: Keras or ONNX Runtime model.
        files: Paths to score.
        batch_size: Images decoded and scored at a time (at least 1).
        ood_check: Run the cheap checks and the model's OOD detector.
        heatmaps: Folder for Grad-CAM overlays of accepted images (``None``: none).
        heatmap_network: Keras network for the heatmaps (needed with ``heatmaps``; it never
            scores).
        workers: Decoding threads.
        prefetch: Batches decoded ahead.
        scorer: Reuse a scorer (default: built for ``model`` and its detector).
        detector: The OOD detector (default: the model's own, if fitted).
        identity: What each prediction records of the model (default:
            :func:`model_identity`); each also gets ``scored_at``.

    Raises:
        InvalidInputError: ``batch_size`` or ``workers`` below 1, or heatmaps without a
            network.
    """
    check_batching(batch_size, workers)
    identity = model_identity(model) if identity is None else identity
    if detector is None and ood_check:
        detector = load_detector(model)
    scorer = scorer or make_scorer(model, detector, ood_check)
    directory = Path(heatmaps) if heatmaps is not None else None
    if directory is not None and heatmap_network is None:
        raise InvalidInputError("heatmaps need the Keras network (Grad-CAM needs gradients)")
    for start, items in iter_decoded(files, model.preprocess, batch_size, workers, prefetch):
        decoded = [item for item in items if isinstance(item, DecodedImage)]
        positions = [start + i for i, item in enumerate(items) if isinstance(item, DecodedImage)]
        results = predict_decoded(scorer, decoded, detector, ood_check)
        names = [files[p] for p in positions]
        if directory is not None and heatmap_network is not None and decoded:
            results = write_heatmaps(heatmap_network, decoded, results, names, directory)
        scored = dict(zip(positions, results, strict=True))
        now = now_utc()
        for offset, item in enumerate(items):
            position = start + offset
            if isinstance(item, DecodeFailure):
                prediction = decode_failed(files[position], item)
            else:
                prediction = scored[position].replace(path=files[position])
            yield prediction.traced(identity, now)


def check_batching(batch_size: int, workers: int = 1) -> None:
    """Refuse a batch size or a number of decoding threads below 1.

    Raises:
        InvalidInputError: Either is below 1.
    """
    if int(batch_size) < 1:
        raise InvalidInputError(f"batch size {batch_size}: give at least 1 image per batch")
    if int(workers) < 1:
        raise InvalidInputError(f"workers {workers}: give at least 1 decoding thread")
