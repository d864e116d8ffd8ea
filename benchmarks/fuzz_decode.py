"""Fuzz the decode path with atheris: nothing a file holds may raise anything but
``pneumoscan.errors.ImageReadError`` (issue 12).

    pip install -e .[fuzz]
    python benchmarks/fuzz_decode.py --seconds 600 [--format DICOM] [--corpus DIR] [--firewall]

The seed corpus is built from a real X-ray (the site sample when ../shared/data is there,
else the repo's fixtures) in every accepted format (see ``tests/fuzzcorpus.py``): JPEG
(baseline, progressive), PNG (8 and 16 bit), TIFF (LZW, 16 bit), and DICOM raw, RLE,
MONOCHROME1, with a VOI LUT, JPEG, JPEG 2000 and deflated. ``--format`` seeds one format only
(run one fuzzer per format to give each its share of inputs). By default the inner decoder
runs without the per-file firewall, so a crash is a root cause still to fix with a specific
message; ``--firewall`` fuzzes the public ``decode_image`` instead. An input that takes over
5 s (``-timeout``) or 1 GB of memory (``-rss_limit_mb``) is a finding too, as is any
exception but ``ImageReadError``. Findings are written by atheris as ``crash-*``,
``timeout-*`` or ``oom-*`` files in the working folder; per-format runs issue 22 reported:

    nohup nice -n 19 .venv/bin/python benchmarks/fuzz_decode.py --format JPEG --seconds 1200 \
        > runs/fuzz-JPEG/log 2>&1 &
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import fuzzcorpus  # noqa: E402
from pneumoscan.data.formats import ACCEPTED_FORMATS  # noqa: E402
from pneumoscan.data.limits import decode_deadline  # noqa: E402
from pneumoscan.data.preprocess import PreprocessConfig, _decode_image, decode_image  # noqa: E402
from pneumoscan.errors import ImageReadError  # noqa: E402

CONFIG = PreprocessConfig(image_size=(32, 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="How long to fuzz.")
    parser.add_argument("--corpus", type=Path, help="Corpus folder (default: a temporary one).")
    parser.add_argument("--firewall", action="store_true", help="Fuzz the public decoder.")
    parser.add_argument("--format", choices=ACCEPTED_FORMATS, help="Seed only this format.")
    args, rest = parser.parse_known_args()
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: pip install -e .[fuzz]")
    decode = decode_image if args.firewall else _decode_image
    warnings.simplefilter("ignore")

    def one_input(data: bytes) -> None:
        # ImageReadError is the one allowed outcome for a bad file; anything else crashes.
        # The deadline is the production one, so a slow input must beat it to be a finding.
        with contextlib.suppress(ImageReadError), decode_deadline():
            decode(data, CONFIG)

    corpus = args.corpus or Path(tempfile.mkdtemp(prefix="pneumoscan-fuzz-"))
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = fuzzcorpus.seeds_by_format()[args.format] if args.format else fuzzcorpus.seed_corpus()
    for name, data in seeds.items():
        (corpus / name).write_bytes(data)
    print(f"seed corpus in {corpus}; fuzzing for {args.seconds} s", flush=True)
    atheris.instrument_all()
    argv = [
        sys.argv[0],
        *rest,
        f"-max_total_time={args.seconds}",
        "-rss_limit_mb=1024",
        "-timeout=5",
        str(corpus),
    ]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
