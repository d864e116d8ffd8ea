"""Tests for pneumoscan.data.dataset: layouts, patient ids, unreadable files, patient-grouped
split."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pneumoscan.data.dataset import (
    assign_validation_split,
    data_fingerprint,
    find_class_folders,
    patient_id_from_name,
    patients_in_several_splits,
    scan_dataset,
    source_from_name,
    subtype_from_name,
)
from pneumoscan.errors import DatasetError

from conftest import FIXTURES, SHARED_TRAIN, fixture_images, needs_shared


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0011-0001-0002.jpeg", "IM-0011"),
        ("NORMAL2-IM-0456-0001.jpeg", "NORMAL2-IM-0456"),
        ("scan_from_elsewhere.png", "scan_from_elsewhere"),
    ],
)
def test_patient_id_from_name(name: str, patient: str) -> None:
    assert patient_id_from_name(name) == patient


def test_subtype_from_name() -> None:
    assert subtype_from_name("person1_bacteria_1.jpeg", "PNEUMONIA") == "bacteria"
    assert subtype_from_name("person1_virus_1.jpeg", "PNEUMONIA") == "virus"
    assert subtype_from_name("IM-0001-0001.jpeg", "NORMAL") == "normal"
    assert subtype_from_name("x.png", "PNEUMONIA") == "unknown"


def _kaggle_layout(root: Path, nested: bool = False, lower: bool = False) -> Path:
    base = root / "chest_xray" / "chest_xray" if nested else root
    for split, images in (("train", slice(0, 16)), ("val", slice(16, 18)), ("test", slice(18, 24))):
        for label in ("NORMAL", "PNEUMONIA"):
            folder = base / split / (label.lower() if lower else label)
            folder.mkdir(parents=True)
            for path in fixture_images(label)[images]:
                shutil.copy(path, folder)
    return root


def test_scan_kaggle_layout_nested_and_case_insensitive(tmp_path: Path) -> None:
    table = scan_dataset(_kaggle_layout(tmp_path, nested=True, lower=True))
    counts = table.groupby(["split", "label"]).size().to_dict()
    assert counts[("train", "NORMAL")] == 16
    assert counts[("val", "PNEUMONIA")] == 2
    assert counts[("test", "NORMAL")] == 6
    assert set(table.columns) >= {
        "path",
        "label",
        "split",
        "patient_id",
        "subtype",
        "width",
        "height",
    }
    assert (table["width"] == 224).all() and (table["channels"] == 3).all()


def test_scan_single_class_folder_root() -> None:
    table = scan_dataset(FIXTURES)
    assert set(table["split"]) == {"all"}
    assert set(table["label"]) == {"NORMAL", "PNEUMONIA"}
    assert len(table) == len(fixture_images("NORMAL")) + len(fixture_images("PNEUMONIA"))


def test_missing_and_empty_roots_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder"):
        find_class_folders(tmp_path / "nope")
    (tmp_path / "cats").mkdir()
    with pytest.raises(DatasetError, match="no NORMAL/ or PNEUMONIA/"):
        find_class_folders(tmp_path)
    (tmp_path / "NORMAL").mkdir()
    with pytest.raises(DatasetError, match=r"hold no \.jpeg"):
        scan_dataset(tmp_path)


def test_unreadable_files_are_flagged_not_fatal(class_folder: Path) -> None:
    normal = class_folder / "NORMAL"
    (normal / "empty.jpeg").write_bytes(b"")
    (normal / "notes.jpeg").write_text("not an image")
    (normal / "README.txt").write_text("ignored: no image extension")
    good = fixture_images("NORMAL")[0].read_bytes()
    (normal / "truncated.jpeg").write_bytes(good[:200])
    table = scan_dataset(class_folder).set_index("path")
    errors = table["error"]
    assert "0 bytes" in errors[str(normal / "empty.jpeg")]
    assert "not an image" in errors[str(normal / "notes.jpeg")]
    assert errors[str(normal / "truncated.jpeg")] != ""
    assert str(normal / "README.txt") not in table.index
    assert (errors == "").sum() == len(fixture_images("NORMAL")) + len(fixture_images("PNEUMONIA"))


def test_small_val_is_merged_and_split_by_patient(tmp_path: Path) -> None:
    table = scan_dataset(_kaggle_layout(tmp_path))
    split = assign_validation_split(table, fraction=0.2, seed=1)
    assert not patients_in_several_splits(split)
    val = split[split["split"] == "val"]
    assert set(val["label"]) == {"NORMAL", "PNEUMONIA"}
    # The 4-image val/ folder was merged into train before carving.
    assert (split["split"] == "test").sum() == (table["split"] == "test").sum()
    again = assign_validation_split(table, fraction=0.2, seed=1)
    assert again["split"].tolist() == split["split"].tolist()


def test_large_val_is_kept(tmp_path: Path) -> None:
    table = scan_dataset(_kaggle_layout(tmp_path))
    kept = assign_validation_split(table, min_val_images=4)
    assert kept["split"].tolist() == table["split"].tolist()


def test_fingerprint_changes_with_content(class_folder: Path) -> None:
    before = data_fingerprint(scan_dataset(class_folder))
    target = fixture_images("NORMAL")[0].name
    shutil.copy(fixture_images("PNEUMONIA")[0], class_folder / "NORMAL" / target)
    assert data_fingerprint(scan_dataset(class_folder)) != before


@needs_shared
def test_real_training_split_has_no_patient_leak() -> None:
    table = scan_dataset(SHARED_TRAIN.parent)
    assert len(table) == 5216
    split = assign_validation_split(table, fraction=0.1, seed=42)
    assert not patients_in_several_splits(split)
    val_share = (split["split"] == "val").mean()
    assert 0.07 < val_share < 0.13
    normal_share = split.groupby("split")["label"].apply(lambda s: (s == "NORMAL").mean())
    assert abs(normal_share["val"] - normal_share["train"]) < 0.05


def test_source_from_name() -> None:
    assert source_from_name("NORMAL2-IM-0456-0001.jpeg") == "NORMAL2-IM"
    assert source_from_name("IM-0115-0001.jpeg") == "IM"
    assert source_from_name("person12_bacteria_3.jpeg") == "person"
    assert source_from_name("scan.png") == "other"
