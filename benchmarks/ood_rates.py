"""Measure the out-of-distribution check: false rejections of real X-rays, correct rejections
of things that are not chest X-rays.

Usage:
    python benchmarks/ood_rates.py MODEL [--train DIR] [--site DIR] [--json OUT]

MODEL must carry a fitted detector (``pneumoscan fit-ood``). Real X-rays: every training image
(``../shared/data/chest_xray/train``, the detector's own training set, so an in-sample rate)
and ``../shared/data/site_sample`` (another acquisition, never fitted on). Non-X-rays, written
as PNG files and sent through ``predict_files`` like a user's files: scikit-image and
scikit-learn sample images with greyscale, cropped and mirrored variants; 25x25 greyscale
photos (scikit-image ``lfw_subset``); rendered text and screenshots; noise; blank images; and
inverted X-rays (the site sample and 100 training images, grey levels inverted).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import REPO, SHARED_DATA, machine
from PIL import Image

sys.path.insert(0, str(REPO / "tests"))

import nonxray
from pneumoscan.inference.predict import expand_inputs, load_detector, predict_files
from pneumoscan.models.modelfile import load_model


def write_nonxrays(folder: Path, inverted_sources: list[Path]) -> dict[str, str]:
    """Write every non-X-ray as a PNG; returns file path -> kind."""
    kinds = {}
    generators = [
        nonxray.natural_images(),
        nonxray.small_photos(),
        nonxray.text_images(),
        nonxray.noise_images(),
        nonxray.blank_images(),
        nonxray.inverted_xrays(inverted_sources),
    ]
    for generator in generators:
        for name, pixels in generator:
            path = folder / f"{name}.png"
            Image.fromarray(pixels).save(path)
            kinds[str(path)] = nonxray.kind_of(name)
    return kinds


def run(model_path: str, files: list[str]) -> tuple[list[dict[str, object]], float]:
    loaded = load_model(model_path)
    detector = load_detector(loaded)
    if detector is None:
        raise SystemExit(f"{model_path} has no OOD detector: run `pneumoscan fit-ood` first")
    started = time.perf_counter()
    results = list(predict_files(loaded, files, batch_size=64, detector=detector))
    return results, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--train", default=str(SHARED_DATA / "chest_xray" / "train"))
    parser.add_argument("--site", default=str(SHARED_DATA / "site_sample"))
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    print(machine())
    figures: dict[str, object] = {"model": args.model}
    for name, folder in (("training X-rays", args.train), ("site_sample X-rays", args.site)):
        files, _ = expand_inputs([folder])
        results, seconds = run(args.model, files)
        rejected = [r for r in results if r.status == "rejected"]
        rate = len(rejected) / max(len(results), 1)
        print(f"{name}: {len(rejected)} of {len(results)} rejected ({rate:.2%}), {seconds:.0f} s")
        reasons = Counter(str(r.reason).split(" (")[0] for r in rejected)
        for reason, count in reasons.most_common():
            print(f"    {count:4d}  {reason}")
        figures[name] = {"n": len(results), "rejected": len(rejected), "rate": rate}
    train_files, _ = expand_inputs([args.train])
    site_files, _ = expand_inputs([args.site])
    inverted_sources = [Path(p) for p in site_files] + [Path(p) for p in train_files[::52][:100]]
    with tempfile.TemporaryDirectory() as tmp:
        kinds = write_nonxrays(Path(tmp), inverted_sources)
        results, seconds = run(args.model, sorted(kinds))
    by_kind: dict[str, Counter[str]] = {}
    for result in results:
        by_kind.setdefault(kinds[str(result.path)], Counter())[str(result.status)] += 1
    total = sum(sum(c.values()) for c in by_kind.values())
    caught = sum(c["rejected"] for c in by_kind.values())
    print(f"non-X-rays: {caught} of {total} rejected ({caught / total:.2%}), {seconds:.0f} s")
    for kind, counts in sorted(by_kind.items()):
        n = sum(counts.values())
        print(f"    {kind:12s} {counts['rejected']:4d} of {n:4d} rejected   {dict(counts)}")
    # Reasons without their numbers, e.g. "aspect ratio N (width/height)...".
    reasons = Counter(re.sub(r"[\d.]+", "N", str(r.reason or "")[:40]) for r in results)
    for reason, count in reasons.most_common():
        print(f"    {count:4d}  {reason}")
    missed = [r.path for r in results if r.status != "rejected"]
    if missed:
        print("accepted non-X-rays:", ", ".join(Path(str(p)).name for p in missed))
    figures["non-X-rays"] = {
        "n": total,
        "rejected": caught,
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "accepted": [Path(str(p)).name for p in missed],
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
