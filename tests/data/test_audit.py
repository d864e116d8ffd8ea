"""Tests of the dataset audit on small datasets built from real chest X-rays."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from pneumoscan.data.audit import _close_pairs, audit_dataset, print_audit, write_audit
from pneumoscan.data.dataset import scan_dataset

pytestmark = pytest.mark.shared_data

#: (split, label) -> real training files copied into each temporary dataset.
BASE_FILES: dict[tuple[str, str], list[str]] = {
    ("train", "NORMAL"): [
        "IM-0115-0001.jpeg",
        "IM-0117-0001.jpeg",
        "IM-0119-0001.jpeg",
        "IM-0122-0001.jpeg",
    ],
    ("train", "PNEUMONIA"): [
        "person1_bacteria_1.jpeg",
        "person2_bacteria_3.jpeg",
        "person3_bacteria_10.jpeg",
        "person3_bacteria_11.jpeg",
    ],
    ("test", "NORMAL"): ["IM-0125-0001.jpeg"],
    ("test", "PNEUMONIA"): ["person4_bacteria_14.jpeg"],
}


def _shared_data() -> Path:
    """The project's real data folder (``../shared/data``), or skip the test."""
    root = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not (root / "chest_xray" / "train").is_dir():
        pytest.skip(f"real chest X-rays not found at {root}: these tests need ../shared/data")
    return root


def _source(label: str, name: str) -> Path:
    return _shared_data() / "chest_xray" / "train" / label / name


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A Kaggle-layout dataset of 10 distinct real images, no anomalies."""
    root = tmp_path / "chest_xray"
    for (split, label), names in BASE_FILES.items():
        folder = root / split / label
        folder.mkdir(parents=True)
        for name in names:
            shutil.copyfile(_source(label, name), folder / name)
    return root


def _audit(root: Path) -> dict[str, Any]:
    audit = audit_dataset(scan_dataset(root))
    json.dumps(audit)  # must be JSON-serialisable as it is
    return audit


def _resave(source: Path, target: Path, quality: int, offset: int = 0) -> None:
    """Write a JPEG copy of ``source`` at another quality, optionally 1 grey level brighter."""
    with Image.open(source) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.int16) + offset
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target, quality=quality)


def test_counts_and_no_findings_on_distinct_images(dataset: Path) -> None:
    audit = _audit(dataset)

    assert audit["n_images"] == 10
    assert audit["counts"]["by_split"]["train"] == {"NORMAL": 4, "PNEUMONIA": 4, "total": 8}
    assert audit["counts"]["by_split"]["test"] == {"NORMAL": 1, "PNEUMONIA": 1, "total": 2}
    assert audit["counts"]["by_label"] == {"NORMAL": 5, "PNEUMONIA": 5}
    assert audit["patients"]["by_split"]["train"] == {"NORMAL": 4, "PNEUMONIA": 3, "total": 7}
    assert audit["image_sizes"]["NORMAL"]["count"] == 5
    assert audit["exact_duplicates"]["groups_count"] == 0
    assert audit["near_duplicates"]["pairs_count"] == 0
    assert audit["patients_across_splits"]["count"] == 0
    assert audit["unreadable"] == []


def test_uniform_sizes_are_reported_as_removed_not_as_no_gap(dataset: Path) -> None:
    gap = _audit(dataset)["size_gap"]

    assert gap["status"] == "uniform_size"
    assert gap["gap"] is None
    assert "already removed" in gap["warning"]


def test_byte_copy_is_an_exact_duplicate_across_split_and_patient(dataset: Path) -> None:
    original = dataset / "train" / "NORMAL" / "IM-0115-0001.jpeg"
    shutil.copyfile(original, dataset / "test" / "NORMAL" / "IM-0999-0001.jpeg")

    exact = _audit(dataset)["exact_duplicates"]

    assert exact["groups_count"] == 1
    group = exact["groups"][0]
    assert sorted(Path(p).name for p in group["paths"]) == [
        "IM-0115-0001.jpeg",
        "IM-0999-0001.jpeg",
    ]
    assert group["spans_splits"] and group["spans_patients"] and not group["spans_labels"]


def test_altered_copies_are_near_duplicates_not_exact(dataset: Path) -> None:
    folder = dataset / "train" / "NORMAL"
    _resave(folder / "IM-0115-0001.jpeg", folder / "IM-0115-0002.jpeg", quality=50)
    _resave(folder / "IM-0117-0001.jpeg", dataset / "test" / "NORMAL" / "IM-0117-0002.jpeg", 95, 1)

    audit = _audit(dataset)
    near = audit["near_duplicates"]

    assert audit["exact_duplicates"]["groups_count"] == 0
    assert near["pairs_count"] == 2
    assert near["pairs_spanning_splits"] == 1
    found = {tuple(sorted(Path(p).name for p in pair["paths"])) for pair in near["examples"]}
    assert ("IM-0115-0001.jpeg", "IM-0115-0002.jpeg") in found
    assert ("IM-0117-0001.jpeg", "IM-0117-0002.jpeg") in found
    assert all(p["confirmed"] == (p["thumbnail_correlation"] >= 0.99) for p in near["examples"])


def test_unreadable_files_are_listed_and_figures_written(dataset: Path, tmp_path: Path) -> None:
    folder = dataset / "train" / "PNEUMONIA"
    data = (folder / "person1_bacteria_1.jpeg").read_bytes()
    (folder / "person8_bacteria_1.jpeg").write_bytes(data[: len(data) // 3])
    (folder / "person9_bacteria_1.jpeg").write_bytes(b"")

    audit = write_audit(dataset, tmp_path / "out", seed=3)

    reasons = {Path(item["path"]).name: item["reason"] for item in audit["unreadable"]}
    assert set(reasons) == {"person8_bacteria_1.jpeg", "person9_bacteria_1.jpeg"}
    assert "truncated" in reasons["person8_bacteria_1.jpeg"]
    assert "empty" in reasons["person9_bacteria_1.jpeg"]
    assert audit["counts"]["readable"] == 10 and audit["counts"]["unreadable"] == 2
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["n_images"] == 12
    console = Console(record=True, width=200)
    print_audit(audit, console)
    assert "person9_bacteria_1.jpeg: empty file" in console.export_text()
    for name in ("class_balance.png", "sample_grid.png"):
        with Image.open(tmp_path / "out" / name) as image:
            image.load()
            assert image.width > 100 and image.height > 100
            assert np.asarray(image.convert("L")).std() > 5  # not a blank canvas


def test_patient_in_two_splits_is_reported(dataset: Path) -> None:
    shutil.copyfile(
        _source("PNEUMONIA", "person1_bacteria_2.jpeg"),
        dataset / "test" / "PNEUMONIA" / "person1_bacteria_2.jpeg",
    )

    shared = _audit(dataset)["patients_across_splits"]

    assert shared["count"] == 1
    assert shared["patients"] == {"person1": ["test", "train"]}
    assert "numbered separately" in shared["note"]


def test_size_gap_warning_fires_when_one_class_is_stretched(dataset: Path) -> None:
    for path in (dataset / "train" / "PNEUMONIA").iterdir():
        with Image.open(path) as image:
            wide = image.resize((224, 160))
        buffer = io.BytesIO()
        wide.save(buffer, format="JPEG")
        path.write_bytes(buffer.getvalue())

    gap = _audit(dataset)["size_gap"]

    assert gap["status"] == "gap" and gap["gap"] is True
    assert gap["mean_relative_difference"]["aspect"] > 0.05
    assert gap["size_only_auc"] > 0.6
    assert "aspect" in gap["warning"] and "shortcut" in gap["warning"]


def test_close_pairs_matches_brute_force() -> None:
    # Crosses the 256-row block boundary; planted pairs make sure some matches exist.
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=600, dtype=np.uint64)
    hashes[300] = hashes[10] ^ np.uint64(0b1011)
    hashes[599] = hashes[257] ^ np.uint64(1 << 40)

    found = set(_close_pairs(hashes, max_distance=4))

    values = [int(h) for h in hashes]
    expected = {
        (i, j, (values[i] ^ values[j]).bit_count())
        for i in range(len(values))
        for j in range(i + 1, len(values))
        if (values[i] ^ values[j]).bit_count() <= 4
    }
    assert found == expected
    assert {(10, 300, 3), (257, 599, 1)} <= found
