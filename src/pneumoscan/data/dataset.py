"""Scan a chest X-ray dataset into a table and split it by patient.

Accepted layouts (class folder names are case-insensitive):

* the Kaggle copy: ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``, also nested as
  ``ROOT/chest_xray/chest_xray/...``;
* a single folder holding ``NORMAL/`` and ``PNEUMONIA/``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pneumoscan.constants import (
    CLASSES,
    DEFAULT_SEED,
    DEFAULT_VAL_FRACTION,
    IMAGE_EXTENSIONS,
    MIN_VAL_IMAGES,
    SPLITS,
)
from pneumoscan.data.preprocess import read_header as read_image_header
from pneumoscan.errors import DatasetError, ImageReadError, InvalidInputError

COLUMNS = [
    "path",
    "label",
    "split",
    "patient_id",
    "subtype",
    "width",
    "height",
    "channels",
    "error",
]

_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM = re.compile(r"^((?:[A-Za-z0-9]+-)?IM-\d+)-", re.IGNORECASE)
_MAX_NESTING = 3


@dataclass(frozen=True)
class ClassFolder:
    """One ``split/label`` folder of a dataset."""

    split: str
    label: str
    path: Path


def patient_id_from_name(file_name: str) -> str:
    """Return the patient a Kermany file name belongs to.

    ``person12_bacteria_3.jpeg`` -> ``person12``; ``IM-0115-0001.jpeg`` -> ``IM-0115``;
    ``NORMAL2-IM-0456-0001.jpeg`` -> ``NORMAL2-IM-0456``. Other names give their stem, so an
    unknown naming scheme treats every image as its own patient.

    Args:
        file_name: Base name of the image file.
    """
    stem = Path(file_name).stem
    for pattern in (_PERSON, _IM):
        match = pattern.match(stem + "-")
        if match:
            return match.group(1)
    return stem


def source_from_name(file_name: str) -> str:
    """The acquisition series a Kermany file name comes from: ``NORMAL2-IM``, ``IM``,
    ``person`` (pneumonia files), or ``other``.

    At a new site the errors concentrate in one series (``NORMAL2-IM`` normals were flagged
    far more often than ``IM`` ones), so specificity is reported per series.
    """
    stem = Path(file_name).stem.upper()
    for prefix in ("NORMAL2-IM-", "IM-", "PERSON"):
        if stem.startswith(prefix):
            return prefix.rstrip("-") if prefix != "PERSON" else "person"
    return "other"


def subtype_from_name(file_name: str, label: str) -> str:
    """Return ``normal``, ``bacteria``, ``virus`` or ``unknown`` (pneumonia of unnamed cause)."""
    if label == "NORMAL":
        return "normal"
    lowered = file_name.lower()
    for subtype in ("bacteria", "virus"):
        if subtype in lowered:
            return subtype
    return "unknown"


def _class_dirs(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for child in sorted(folder.iterdir()):
        if child.is_dir() and child.name.upper() in CLASSES:
            found[child.name.upper()] = child
    return found


def _split_dirs(folder: Path) -> dict[str, Path]:
    return {
        child.name.lower(): child
        for child in sorted(folder.iterdir())
        if child.is_dir() and child.name.lower() in SPLITS
    }


def find_class_folders(root: str | Path) -> list[ClassFolder]:
    """Locate the class folders of a dataset root.

    Args:
        root: A Kaggle-style root (with ``train/`` etc.), its nested ``chest_xray`` copy, or a
            folder holding ``NORMAL/`` and ``PNEUMONIA/``.

    Returns:
        One entry per class folder found. A single class folder root gets split ``all``.

    Raises:
        DatasetError: The root is missing or contains no class folders.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder (give a dataset root or a class folder root)")
    folder = root
    for _ in range(_MAX_NESTING):
        classes = _class_dirs(folder)
        if classes:
            split = folder.name.lower() if folder.name.lower() in SPLITS else "all"
            return [ClassFolder(split, label, path) for label, path in classes.items()]
        splits = _split_dirs(folder)
        if splits:
            found = [
                ClassFolder(split, label, path)
                for split, split_dir in splits.items()
                for label, path in _class_dirs(split_dir).items()
            ]
            if found:
                return found
        nested = [c for c in folder.iterdir() if c.is_dir() and c.name.lower() == "chest_xray"]
        if not nested:
            break
        folder = nested[0]
    raise DatasetError(
        f"{root}: no NORMAL/ or PNEUMONIA/ class folders found. Expected ROOT/NORMAL and "
        "ROOT/PNEUMONIA, or ROOT/train|val|test/NORMAL|PNEUMONIA (the Kaggle layout)."
    )


def read_header(path: Path) -> tuple[int, int, int, str]:
    """Read an image's size and channel count without decoding its pixels.

    The header goes through every check decoding makes (format, size, budget, minimum side,
    scans) behind the same per-file firewall, so a file that decoding would refuse (a
    decompression bomb, a GIF named ``.png``) is recorded as unreadable here, never raised.

    Returns:
        ``(width, height, channels, error)``; on failure the sizes are 0 and ``error`` says why.
    """
    try:
        width, height, channels, _ = read_image_header(path, name=path.name)
    except Exception as exc:  # the per-file firewall: no file's content may end a scan
        return 0, 0, 0, _reason(path.name, exc)
    return width, height, channels, ""


def _reason(name: str, exc: Exception) -> str:
    """The message without the file name in front (the table's row already names the file)."""
    message = str(exc) if isinstance(exc, ImageReadError) else f"unreadable: {exc!r}"
    return message.removeprefix(f"{name}: ")


def _iter_files(folder: Path) -> Iterable[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def scan_dataset(root: str | Path, read_headers: bool = True) -> pd.DataFrame:
    """Scan a dataset into a table with one row per image file.

    Files without an image extension (.jpeg .jpg .png) are left out; files that have one but
    cannot be read keep their row with the reason in ``error``, so callers can report them.

    Args:
        root: Dataset root; see :func:`find_class_folders`.
        read_headers: Open each file to fill ``width``, ``height``, ``channels`` and ``error``.

    Returns:
        A table with columns ``path, label, split, patient_id, subtype, width, height,
        channels, error``, sorted by path.

    Raises:
        DatasetError: No class folders, or no image files in any of them.
    """
    rows = []
    for folder in find_class_folders(root):
        for path in _iter_files(folder.path):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            width, height, channels, error = read_header(path) if read_headers else (0, 0, 0, "")
            rows.append(
                {
                    "path": str(path),
                    "label": folder.label,
                    "split": folder.split,
                    "patient_id": patient_id_from_name(path.name),
                    "subtype": subtype_from_name(path.name, folder.label),
                    "width": width,
                    "height": height,
                    "channels": channels,
                    "error": error,
                }
            )
    if not rows:
        raise DatasetError(f"{root}: the class folders hold no .jpeg, .jpg or .png files")
    return pd.DataFrame(rows, columns=COLUMNS).sort_values("path", ignore_index=True)


def empty_classes(table: pd.DataFrame) -> list[str]:
    """Return the classes with no readable image in ``table``."""
    readable = table[table["error"] == ""]
    return [label for label in CLASSES if not (readable["label"] == label).any()]


def assign_validation_split(
    table: pd.DataFrame,
    fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    min_val_images: int = MIN_VAL_IMAGES,
) -> pd.DataFrame:
    """Make sure the table has a usable, patient-grouped validation split.

    A ``val`` split with at least ``min_val_images`` images is kept. Otherwise the small ``val``
    (if any) is merged into ``train`` (``all`` counts as train) and a stratified split of about
    ``fraction`` of the patients is carved out of it, so no patient is in two splits.

    Args:
        table: Output of :func:`scan_dataset`.
        fraction: Share of training patients moved to validation.
        seed: Seed of the split.
        min_val_images: Smallest ``val`` folder that is used as it is.

    Returns:
        A copy of ``table`` with ``split`` updated.
    """
    table = table.copy()
    table.loc[table["split"] == "all", "split"] = "train"
    if (table["split"] == "val").sum() >= min_val_images:
        return table
    table.loc[table["split"] == "val", "split"] = "train"
    if not 0.0 < fraction < 0.5:
        raise InvalidInputError(f"val fraction must be in (0, 0.5), got {fraction}")
    pool = table.index[table["split"] == "train"]
    n_splits = max(2, round(1.0 / fraction))
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    labels = table.loc[pool, "label"].to_numpy()
    groups = table.loc[pool, "patient_id"].to_numpy()
    _, val_positions = next(folds.split(np.zeros(len(pool)), labels, groups))
    table.loc[pool[val_positions], "split"] = "val"
    return table


def patients_in_several_splits(table: pd.DataFrame) -> dict[str, list[str]]:
    """Return ``{patient_id: [splits]}`` for patients that appear in more than one split."""
    splits = table.groupby("patient_id")["split"].agg(lambda s: sorted(set(s)))
    return {str(pid): names for pid, names in splits.items() if len(names) > 1}


def file_sha1(path: str | Path) -> str:
    """SHA-1 of a file's bytes (content identity; not a security hash), read a megabyte at a
    time so that no file is held whole in memory, whatever its size."""
    digest = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as file:
        while block := file.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(table: pd.DataFrame) -> str:
    """A SHA-256 over the sorted (label, content hash) pairs of a table's images."""
    pairs = sorted(
        f"{label}:{file_sha1(path)}"
        for path, label in zip(table["path"], table["label"], strict=True)
    )
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def select_split(
    table: pd.DataFrame, split: str, model_metadata: dict[str, Any] | None = None
) -> pd.DataFrame:
    """Rows of ``split``; a bare class-folder root (split ``all``) is used whole.

    ``val`` on a dataset whose ``val/`` folder is missing or tiny re-creates the
    patient-grouped validation split the model was trained with (same fraction and seed,
    as recorded in its metadata), so a model can be scored on its own held-out patients.

    Raises:
        DatasetError: The split is absent; the message lists the splits present.
    """
    if set(table["split"]) == {"all"}:
        return table
    if split == "val" and model_metadata and "split" in model_metadata.get("data", {}):
        recorded = model_metadata["data"]["split"]
        table = assign_validation_split(table, recorded["val_fraction"], recorded["seed"])
    chosen = table[table["split"] == split]
    if chosen.empty:
        present = sorted(set(table["split"]))
        raise DatasetError(
            f"no images in split {split!r}; this dataset has {present} (use --split)"
        )
    return chosen.reset_index(drop=True)
