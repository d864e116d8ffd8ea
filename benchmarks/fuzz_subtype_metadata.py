"""Fuzz the subtype head's metadata reader with atheris: whatever a model file's ``subtype``
entry holds, reading it raises nothing but ``pneumoscan.errors.ModelFileError``, and a head it
accepts scores features to probabilities in [0, 1] and calls them bacterial or viral.

    python benchmarks/fuzz_subtype_metadata.py --seconds 300

The seed is the shipped model's own entry (JSON text); libFuzzer mutates its bytes, and inputs
that are not JSON are skipped (the JSON parser is not ours to fuzz). Findings are written as
``crash-*`` files in the working folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    from pneumoscan.errors import ModelFileError
    from pneumoscan.models.subtype import BACTERIAL, VIRAL, SubtypeHead

from pneumoscan.constants import DEFAULT_MODEL_PATH
from pneumoscan.models.modelfile import read_metadata


def one_input(data: bytes) -> None:
    try:
        entry = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return
    try:
        head = SubtypeHead.from_metadata(entry, "fuzzed")
    except ModelFileError:
        return
    with np.errstate(all="ignore"):
        raw = head.raw_bacterial(np.ones((2, len(head.weights))))
    if not np.all((raw >= 0.0) & (raw <= 1.0)):
        raise AssertionError(f"P(bacterial) outside [0, 1]: {raw}")
    if head.call(0.5) not in (BACTERIAL, VIRAL):
        raise AssertionError("a call that is neither bacterial nor viral")
    written = head.to_metadata()
    json.dumps({key: written[key] for key in ("head", "operating_point")}, allow_nan=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=300)
    args = parser.parse_args()
    corpus = Path(tempfile.mkdtemp(prefix="fuzz-subtype-"))
    entry = read_metadata(DEFAULT_MODEL_PATH)["subtype"]
    entry["head"]["weights"] = entry["head"]["weights"][:8]  # short seeds mutate faster
    (corpus / "shipped").write_text(json.dumps(entry))
    atheris.Setup(
        [sys.argv[0], f"-max_total_time={args.seconds}", "-max_len=8192", str(corpus)],
        one_input,
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main()
