"""Predict on files and folders; every file gets a result, readable or not."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pneumoscan.constants import CLASSES
from pneumoscan.modelfile import LoadedModel


def expand_inputs(inputs: Sequence[str | Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """Files given plus every file under folders given (recursive, any extension).

    Returns:
        ``(files, problems)`` where ``problems`` are error results for paths that do not exist.
    """
    files: list[str] = []
    problems: list[dict[str, Any]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(str(p) for p in item.rglob("*") if p.is_file())
            if not found:
                problems.append(error_result(str(item), f"{item}: folder holds no files"))
            files.extend(found)
        elif item.is_file():
            files.append(str(item))
        else:
            problems.append(error_result(str(item), f"{item}: no such file or folder"))
    return files, problems


def error_result(path: str, message: str) -> dict[str, Any]:
    """The result of a file that produced no probability."""
    return {"path": path, "status": "error", "error": message}


def decide(probability: float, threshold: float) -> str:
    """Class name for a probability at the model's operating threshold."""
    return CLASSES[1] if probability >= threshold else CLASSES[0]


def predict_files(
    model: LoadedModel, files: Sequence[str], batch_size: int = 32
) -> Iterator[dict[str, Any]]:
    """One result per file, in order, streamed as batches finish."""
    from pneumoscan.inference import score_files

    threshold = model.threshold
    for score in score_files(model, files, batch_size=batch_size):
        if score.probability is None:
            yield error_result(score.path, str(score.error))
        else:
            yield {
                "path": score.path,
                "status": "ok",
                "probability": round(score.probability, 6),
                "decision": decide(score.probability, threshold),
                "threshold": threshold,
            }
