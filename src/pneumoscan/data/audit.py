"""Audit a chest X-ray dataset for the flaws that make a model look better than it is.

The audit counts images and patients, compares image sizes between classes (a size gap is a
shortcut a model can learn instead of the disease), finds exact and near-duplicate images
(duplicates across a split boundary leak test data into training), lists patients present in
several splits and files that cannot be read. :func:`audit_dataset` returns a JSON-ready dict;
:func:`write_audit` also writes it to disk together with two figures.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from rich.console import Console
from rich.progress import track
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pneumoscan.constants import CLASSES, DEFAULT_SEED, SPLITS
from pneumoscan.data.dataset import patients_in_several_splits, scan_dataset
from pneumoscan.data.preprocess import DecodeFailure, load_image, read_file
from pneumoscan.plots import plot_class_balance, plot_sample_grid

#: Largest Hamming distance (of 64 bits) between perceptual hashes counted as a near-duplicate.
DEFAULT_NEAR_DUPLICATE_DISTANCE = 4
#: Pearson correlation of 32x32 grey thumbnails that confirms a perceptual-hash match. Frontal
#: chest X-rays share one layout, so phash alone matches different children (on the Kermany
#: training set every phash pair within distance 4 was two different patients, correlation
#: <= 0.962, the highest of 330k pairs within distance 14 was 0.975); re-saved or re-brightened
#: copies correlate >= 0.999.
NEAR_DUPLICATE_CORRELATION = 0.99
#: Relative difference of class means (width, height or aspect) reported as a size gap.
SIZE_GAP_RELATIVE = 0.05
#: Cross-validated AUC of a size-only classifier above which sizes are a usable shortcut.
SIZE_GAP_AUC = 0.6
MAX_EXAMPLES = 50
MAX_LISTED = 200
SAMPLE_GRID_SHAPE = (2, 5)

AUDIT_FILE = "audit.json"
CLASS_BALANCE_FILE = "class_balance.png"
SAMPLE_GRID_FILE = "sample_grid.png"

_THUMBNAIL_SIDE = 32
_BLOCK_ROWS = 256  # rows per block of the pairwise hash comparison (~10 MB per block at 5k)
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)

_MEASURES = {"width": "width", "height": "height", "aspect": "aspect ratio (width/height)"}
_SPLIT_NOTE = (
    "Kermany file names are numbered separately in each split, so the same patient id in two "
    "splits of the public copy may be two different people; treat these as possible leaks to "
    "check, not proven ones."
)


@dataclass(frozen=True)
class _Fingerprints:
    """Content and perceptual hashes of the files that could be decoded."""

    sha1: dict[int, str]  # table row -> SHA-1 of the bytes
    phash: dict[int, int]  # table row -> 64-bit perceptual hash
    thumbnail: dict[int, np.ndarray]  # table row -> centred, unit-norm 32x32 grey thumbnail
    failures: dict[int, str]  # table row -> why decoding failed


def _grey_image(data: bytes, name: str) -> Image.Image:
    """Decode file bytes to an upright greyscale image for perceptual hashing, through the
    project's decoder and its firewall (16-bit PNGs mapped to 8 bits, bombs refused)."""
    return load_image(data, name=name).convert("L")


def _phash_int(image: Image.Image) -> int:
    bits = imagehash.phash(image).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _thumbnail_vector(image: Image.Image) -> np.ndarray:
    """A 32x32 thumbnail, centred and scaled to unit norm: a dot product is a correlation.

    A blank image has no variance and stays all zeros, so it confirms no near-duplicate.
    """
    size = (_THUMBNAIL_SIDE, _THUMBNAIL_SIDE)
    pixels = np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float32).ravel()
    pixels = pixels - pixels.mean()
    norm = float(np.linalg.norm(pixels))
    return pixels / norm if norm > 0 else pixels


def _progress(items: list[Any], console: Console | None, description: str) -> Iterable[Any]:
    if console is None:
        return items
    return track(items, description=description, console=console, transient=True)


def _fingerprint(table: pd.DataFrame, console: Console | None) -> _Fingerprints:
    """Hash every file without a scan error once: SHA-1 of the bytes, phash of the pixels."""
    sha1: dict[int, str] = {}
    phash: dict[int, int] = {}
    thumbnail: dict[int, np.ndarray] = {}
    failures: dict[int, str] = {}
    rows = [
        (int(i), str(p))
        for i, p, e in zip(table.index, table["path"], table["error"], strict=True)
        if not e
    ]
    for row, path in _progress(rows, console, f"Hashing {len(rows)} images"):
        name = Path(path).name
        try:
            if not Path(path).exists():
                failures[row] = "no such file (removed after the scan)"
                continue
            data = read_file(path, name=name)
            sha1[row] = hashlib.sha1(data, usedforsecurity=False).hexdigest()
            grey = _grey_image(data, name)
            phash[row] = _phash_int(grey)
            thumbnail[row] = _thumbnail_vector(grey)
        except Exception as exc:  # the per-file firewall: no file's content may end an audit
            # The header scan does not decode pixels; a truncated file fails here.
            failures[row] = DecodeFailure.from_exception(name, exc).message.removeprefix(
                f"{name}: "
            )
    return _Fingerprints(sha1, phash, thumbnail, failures)


def _count_table(table: pd.DataFrame, value: str | None = None) -> pd.DataFrame:
    """Split x class table of image counts, or of distinct ``value`` per cell."""
    grouped = table.groupby(["split", "label"])
    cells = grouped.size() if value is None else grouped[value].nunique()
    frame = cells.unstack("label", fill_value=0)
    labels = [c for c in CLASSES if c in frame.columns] + [
        c for c in frame.columns if c not in CLASSES
    ]
    order = [s for s in (*SPLITS, "all") if s in frame.index]
    order += [s for s in frame.index if s not in order]
    return frame.reindex(index=order, columns=labels, fill_value=0).astype(int)


def _nested_counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    return {
        str(split): {str(label): int(n) for label, n in row.items()} | {"total": int(row.sum())}
        for split, row in frame.iterrows()
    }


def _counts(table: pd.DataFrame, readable: pd.Series) -> dict[str, Any]:
    frame = _count_table(table)
    return {
        "by_split": _nested_counts(frame),
        "by_label": {str(label): int(n) for label, n in frame.sum().items()},
        "total": len(table),
        "readable": int(readable.sum()),
        "unreadable": int((~readable).sum()),
    }


def _patients(table: pd.DataFrame) -> dict[str, Any]:
    labels_per_patient = table.groupby("patient_id")["label"].nunique()
    both = sorted(str(p) for p in labels_per_patient.index[labels_per_patient > 1])
    return {
        "by_split": _nested_counts(_count_table(table, "patient_id")),
        "total": int(table["patient_id"].nunique()),
        "images_per_patient_max": int(table.groupby("patient_id").size().max()),
        "with_both_labels": both[:MAX_LISTED],
        "with_both_labels_count": len(both),
    }


def _stats(values: pd.Series) -> dict[str, float]:
    array = values.to_numpy(dtype=float)
    return {
        "mean": round(float(array.mean()), 4),
        "std": round(float(array.std()), 4),  # population std: defined for a single image too
        "min": round(float(array.min()), 4),
        "median": round(float(np.median(array)), 4),
        "max": round(float(array.max()), 4),
    }


def _image_sizes(sized: pd.DataFrame) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for label, group in sized.groupby("label"):
        result[str(label)] = {"count": len(group)} | {
            column: _stats(group[column]) for column in ("width", "height", "aspect")
        }
    return result


def _size_only_auc(sized: pd.DataFrame, positive: str, seed: int) -> float | None:
    """Cross-validated AUC of a logistic regression on (log width, log height) alone."""
    target = (sized["label"] == positive).to_numpy(dtype=int)
    folds = min(5, int(np.bincount(target, minlength=2).min()))
    if folds < 2:
        return None
    features = np.log(sized[["width", "height"]].to_numpy(dtype=float))
    model = make_pipeline(StandardScaler(), LogisticRegression())
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return round(
        float(cross_val_score(model, features, target, cv=cv, scoring="roc_auc").mean()), 4
    )


def _size_gap(sized: pd.DataFrame, seed: int) -> dict[str, Any]:
    labels = [c for c in CLASSES if (sized["label"] == c).any()]
    distinct = sized[["width", "height"]].drop_duplicates()
    base: dict[str, Any] = {"distinct_sizes": len(distinct), "compared": labels}
    if len(labels) < 2:
        return base | {
            "status": "single_class",
            "gap": None,
            "warning": "Only one class has readable images: no size comparison.",
        }
    if len(distinct) == 1:
        width, height = (int(v) for v in distinct.iloc[0])
        warning = (
            f"All {len(sized)} readable images are {width}x{height}: size information was already "
            "removed (every image has the same size), so this audit cannot tell whether the "
            "classes differed in size or aspect ratio originally. Audit the original-resolution "
            "images to check; a squash-resize keeps any aspect gap as a distortion of the anatomy."
        )
        return base | {"status": "uniform_size", "gap": None, "warning": warning}
    reference, other = labels[0], labels[1]
    columns = ["width", "height", "aspect"]
    means = {
        label: sized.loc[sized["label"] == label, columns].to_numpy(dtype=float).mean(axis=0)
        for label in (reference, other)
    }
    ratios = means[other] / means[reference] - 1.0
    relative = {column: round(float(r), 4) for column, r in zip(columns, ratios, strict=True)}
    auc = _size_only_auc(sized, other, seed)
    notable = {c: d for c, d in relative.items() if abs(d) > SIZE_GAP_RELATIVE}
    gap = bool(notable) or (auc is not None and auc > SIZE_GAP_AUC)
    return base | {
        "status": "gap" if gap else "no_notable_gap",
        "gap": gap,
        "mean_relative_difference": relative,
        "relative_difference_of": f"{other} mean / {reference} mean - 1",
        "size_only_auc": auc,
        "warning": _gap_warning(reference, other, notable, auc) if gap else "",
    }


def _gap_warning(reference: str, other: str, notable: dict[str, float], auc: float | None) -> str:
    parts = [
        f"{other} images are on average {abs(diff):.0%} "
        f"{'larger' if diff > 0 else 'smaller'} in {_MEASURES[name]} than {reference} images"
        for name, diff in notable.items()
    ]
    if auc is not None and auc > SIZE_GAP_AUC:
        parts.append(f"a classifier on (width, height) alone reaches cross-validated AUC {auc:.2f}")
    return (
        "The classes differ in image size: " + "; ".join(parts) + ". A model can learn this "
        "shortcut instead of the disease (through borders, stretching or resize artefacts); "
        "check that preprocessing removes it and that the test data does not share it."
    )


def _columns(table: pd.DataFrame) -> dict[str, list[str]]:
    """Plain lists of the columns the duplicate reports need (fast per-row lookups)."""
    return {c: [str(v) for v in table[c]] for c in ("path", "label", "patient_id", "split")}


def _spans(columns: dict[str, list[str]], rows: list[int]) -> dict[str, Any]:
    labels = sorted({columns["label"][r] for r in rows})
    patients = sorted({columns["patient_id"][r] for r in rows})
    splits = sorted({columns["split"][r] for r in rows})
    return {
        "labels": labels,
        "patients": patients,
        "splits": splits,
        "spans_labels": len(labels) > 1,
        "spans_patients": len(patients) > 1,
        "spans_splits": len(splits) > 1,
    }


def _exact_duplicates(columns: dict[str, list[str]], sha1: dict[int, str]) -> dict[str, Any]:
    by_hash: dict[str, list[int]] = {}
    for row, digest in sorted(sha1.items()):
        by_hash.setdefault(digest, []).append(row)
    paths = columns["path"]
    groups = [
        {"sha1": digest, "paths": [paths[r] for r in rows]} | _spans(columns, rows)
        for digest, rows in sorted(by_hash.items(), key=lambda item: paths[item[1][0]])
        if len(rows) > 1
    ]
    return {
        "groups_count": len(groups),
        "files_in_groups": sum(len(g["paths"]) for g in groups),
        "redundant_files": sum(len(g["paths"]) - 1 for g in groups),
        "groups_spanning_labels": sum(g["spans_labels"] for g in groups),
        "groups_spanning_patients": sum(g["spans_patients"] for g in groups),
        "groups_spanning_splits": sum(g["spans_splits"] for g in groups),
        "groups": groups[:MAX_LISTED],
    }


def _close_pairs(hashes: np.ndarray, max_distance: int) -> Iterator[tuple[int, int, int]]:
    """Yield ``(i, j, distance)`` for i < j whose 64-bit hashes differ in <= max_distance bits.

    Compares a block of rows against all later hashes at a time: O(n^2) popcounts, vectorised,
    with memory bounded by the block size.
    """
    n = len(hashes)
    for start in range(0, n, _BLOCK_ROWS):
        stop = min(start + _BLOCK_ROWS, n)
        xor = hashes[start:stop, None] ^ hashes[None, start:]
        distance = _POPCOUNT[xor.view(np.uint8)].reshape(*xor.shape, 8).sum(axis=2)
        rows, cols = np.nonzero(distance <= max_distance)
        upper = cols > rows  # each pair once, no self-pairs (columns start at row `start`)
        for i, j in zip(rows[upper], cols[upper], strict=True):
            yield start + int(i), start + int(j), int(distance[i, j])


def _candidate_pairs(
    columns: dict[str, list[str]], prints: _Fingerprints, max_distance: int
) -> list[dict[str, Any]]:
    """Pairs of different files within ``max_distance`` phash bits, with their correlation."""
    rows = sorted(prints.phash)
    hashes = np.array([prints.phash[r] for r in rows], dtype=np.uint64)
    pairs: list[dict[str, Any]] = []
    for i, j, distance in _close_pairs(hashes, max_distance):
        a, b = rows[i], rows[j]
        if prints.sha1[a] == prints.sha1[b]:
            continue  # identical bytes: already an exact duplicate
        correlation = float(prints.thumbnail[a] @ prints.thumbnail[b])
        pair = {
            "paths": [columns["path"][a], columns["path"][b]],
            "distance": distance,
            "thumbnail_correlation": round(correlation, 4),
        }
        pairs.append(pair | _spans(columns, [a, b]))
    return pairs


def _summary(pairs: list[dict[str, Any]], prefix: str) -> dict[str, int]:
    return {
        f"{prefix}_count": len(pairs),
        f"{prefix}_spanning_labels": sum(p["spans_labels"] for p in pairs),
        f"{prefix}_spanning_patients": sum(p["spans_patients"] for p in pairs),
        f"{prefix}_spanning_splits": sum(p["spans_splits"] for p in pairs),
    }


def _near_duplicates(
    columns: dict[str, list[str]],
    prints: _Fingerprints,
    max_distance: int,
    min_correlation: float,
) -> dict[str, Any]:
    candidates = _candidate_pairs(columns, prints, max_distance)
    for pair in candidates:
        pair["confirmed"] = pair["thumbnail_correlation"] >= min_correlation
    confirmed = [p for p in candidates if p["confirmed"]]
    # Examples most likely to matter first: confirmed, then across labels, splits, patients.
    candidates.sort(
        key=lambda p: (
            not p["confirmed"],
            not p["spans_labels"],
            not p["spans_splits"],
            not p["spans_patients"],
            p["distance"],
        )
    )
    histogram = Counter(int(p["distance"]) for p in candidates)
    return {
        "max_distance": max_distance,
        "min_correlation": min_correlation,
        "method": (
            "candidates: imagehash.phash (64 bits) of the greyscale image within max_distance "
            "Hamming bits, exact duplicates left out; confirmed (counted in pairs_*): Pearson "
            "correlation of 32x32 greyscale thumbnails >= min_correlation. Unconfirmed "
            "candidates are usually different patients whose X-rays merely look alike."
        ),
        **_summary(confirmed, "pairs"),
        "images_involved": len({path for p in confirmed for path in p["paths"]}),
        **_summary(candidates, "candidate_pairs"),
        "candidate_pairs_by_distance": {str(d): histogram[d] for d in sorted(histogram)},
        "examples": candidates[:MAX_EXAMPLES],
    }


def _across_splits(table: pd.DataFrame) -> dict[str, Any]:
    shared = patients_in_several_splits(table)
    splits = sorted(set(table["split"]))
    result: dict[str, Any] = {
        "count": len(shared),
        "patients": dict(list(sorted(shared.items()))[:MAX_LISTED]),
        "note": _SPLIT_NOTE,
    }
    if len(splits) < 2:
        result["note"] = (
            f"Only one split ({splits[0]}) present: no patient can be shared. " + _SPLIT_NOTE
        )
    return result


def _unreadable(table: pd.DataFrame, failures: dict[int, str]) -> list[dict[str, str]]:
    found = [
        {"path": str(path), "reason": str(error), "stage": "scan"}
        for path, error in zip(table["path"], table["error"], strict=True)
        if error
    ]
    found += [
        {"path": str(table.at[r, "path"]), "reason": reason, "stage": "decode"}
        for r, reason in failures.items()
    ]
    return sorted(found, key=lambda item: item["path"])


def audit_dataset(
    table: pd.DataFrame,
    near_duplicate_distance: int = DEFAULT_NEAR_DUPLICATE_DISTANCE,
    *,
    near_duplicate_correlation: float = NEAR_DUPLICATE_CORRELATION,
    seed: int = DEFAULT_SEED,
    console: Console | None = None,
) -> dict[str, Any]:
    """Audit a scanned dataset; reads the image files but writes nothing.

    Args:
        table: Output of :func:`pneumoscan.data.dataset.scan_dataset`.
        near_duplicate_distance: Largest Hamming distance between 64-bit perceptual hashes
            that makes a pair a near-duplicate candidate.
        near_duplicate_correlation: Thumbnail correlation that confirms a candidate.
        seed: Seed of the cross-validation folds of the size-only classifier.
        console: Show hashing progress on this console; ``None`` is silent.

    Returns:
        A JSON-serialisable dict with keys ``n_images``, ``counts``, ``patients``,
        ``image_sizes``, ``size_gap``, ``exact_duplicates``, ``near_duplicates``,
        ``patients_across_splits`` and ``unreadable``.
    """
    table = table.reset_index(drop=True)
    prints = _fingerprint(table, console)
    readable = (table["error"] == "") & ~table.index.isin(list(prints.failures))
    sized = table[readable & (table["width"] > 0) & (table["height"] > 0)].copy()
    sized["aspect"] = sized["width"] / sized["height"]
    columns = _columns(table)
    return {
        "n_images": len(table),
        "counts": _counts(table, readable),
        "patients": _patients(table),
        "image_sizes": _image_sizes(sized),
        "size_gap": _size_gap(sized, seed),
        "exact_duplicates": _exact_duplicates(columns, prints.sha1),
        "near_duplicates": _near_duplicates(
            columns, prints, near_duplicate_distance, near_duplicate_correlation
        ),
        "patients_across_splits": _across_splits(table),
        "unreadable": _unreadable(table, prints.failures),
    }


def _write_sample_grid(table: pd.DataFrame, bad: set[str], path: Path, seed: int) -> Path:
    """Draw a seeded random sample of readable images, titled with their labels."""
    candidates = table[(table["error"] == "") & ~table["path"].isin(bad)]
    count = min(SAMPLE_GRID_SHAPE[0] * SAMPLE_GRID_SHAPE[1], len(candidates))
    chosen = candidates.sample(n=count, random_state=seed) if count else candidates
    images = [np.asarray(load_image(p).convert("L")) for p in chosen["path"]]
    return plot_sample_grid(images, list(chosen["label"]), path, SAMPLE_GRID_SHAPE, "Random sample")


def write_audit(
    root: str | Path,
    out_dir: str | Path,
    seed: int = DEFAULT_SEED,
    console: Console | None = None,
) -> dict[str, Any]:
    """Scan a dataset, audit it, and write ``audit.json`` plus two figures into ``out_dir``.

    Args:
        root: Dataset root; see :func:`pneumoscan.data.dataset.find_class_folders`.
        out_dir: Output folder, created if needed.
        seed: Seed of the sample grid and of the size classifier's folds.
        console: Show hashing progress on this console; ``None`` is silent. Print the
            results with :func:`print_audit`.

    Returns:
        The audit dict (see :func:`audit_dataset`) with ``root``, ``files`` and ``timing_s``
        added.

    Raises:
        DatasetError: The root holds no class folders or no image files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    table = scan_dataset(root)
    scanned = time.perf_counter()
    audit = audit_dataset(table, seed=seed, console=console)
    audited = time.perf_counter()
    bad = {item["path"] for item in audit["unreadable"]}
    figures = {
        "class_balance": str(plot_class_balance(_count_table(table), out / CLASS_BALANCE_FILE)),
        "sample_grid": str(_write_sample_grid(table, bad, out / SAMPLE_GRID_FILE, seed)),
    }
    finished = time.perf_counter()
    audit = (
        {"root": str(root)}
        | audit
        | {
            "files": {"audit": str(out / AUDIT_FILE)} | figures,
            "timing_s": {
                "scan": round(scanned - started, 2),
                "audit": round(audited - scanned, 2),
                "figures": round(finished - audited, 2),
                "total": round(finished - started, 2),
            },
        }
    )
    (out / AUDIT_FILE).write_text(json.dumps(audit, indent=2) + "\n", encoding="utf-8")
    return audit


def print_audit(audit: dict[str, Any], console: Console) -> None:
    """Print a short plain-language summary of an audit dict.

    Args:
        audit: Output of :func:`audit_dataset` or :func:`write_audit`.
        console: Where to print.
    """
    exact, near = audit["exact_duplicates"], audit["near_duplicates"]
    counts = ", ".join(f"{label} {n}" for label, n in audit["counts"]["by_label"].items())
    console.print(f"[bold]Audit of {audit.get('root', 'dataset')}[/]: {audit['n_images']} images")
    console.print(f"classes: {counts}; patients: {audit['patients']['total']}")
    console.print(
        f"exact duplicates: {exact['groups_count']} groups "
        f"({exact['groups_spanning_patients']} across patients, "
        f"{exact['groups_spanning_labels']} across labels, "
        f"{exact['groups_spanning_splits']} across splits)"
    )
    console.print(
        f"near-duplicates: {near['pairs_count']} confirmed pairs "
        f"({near['pairs_spanning_patients']} across patients, "
        f"{near['pairs_spanning_labels']} across labels, "
        f"{near['pairs_spanning_splits']} across splits); "
        f"{near['candidate_pairs_count']} phash candidates within {near['max_distance']} bits"
    )
    console.print(f"patients in several splits: {audit['patients_across_splits']['count']}")
    for item in audit["unreadable"][:10]:
        console.print(f"[red]unreadable[/] {item['path']}: {item['reason']}")
    if len(audit["unreadable"]) > 10:
        console.print(f"... {len(audit['unreadable'])} unreadable files in all")
    if audit["size_gap"]["warning"]:
        console.print(f"[yellow]image size:[/] {audit['size_gap']['warning']}")
    if "timing_s" in audit:
        console.print(f"audit took {audit['timing_s']['total']} s")
