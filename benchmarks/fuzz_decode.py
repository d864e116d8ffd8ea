"""Fuzz the decode path with atheris: nothing a file holds may raise anything but
``pneumoscan.errors.ImageReadError`` (issue 12).

    pip install -e .[fuzz]
    python benchmarks/fuzz_decode.py --seconds 600 [--corpus DIR] [--firewall]

The seed corpus is built from a real X-ray (the site sample when ../shared/data is there,
else the repo's fixtures) in every input format: JPEG, PNG (8 and 16 bit), TIFF, and DICOM
raw, RLE, MONOCHROME1 and with a VOI LUT (see ``tests/fuzzcorpus.py``). By default the
inner decoder runs without the per-file firewall, so a crash is a root cause still to fix
with a specific message; ``--firewall`` fuzzes the public ``decode_image`` instead.
Crashing inputs are written by atheris as ``crash-*`` files in the working folder.
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
from pneumoscan.data.preprocess import PreprocessConfig, _decode_image, decode_image  # noqa: E402
from pneumoscan.errors import ImageReadError  # noqa: E402

CONFIG = PreprocessConfig(image_size=(32, 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="How long to fuzz.")
    parser.add_argument("--corpus", type=Path, help="Corpus folder (default: a temporary one).")
    parser.add_argument("--firewall", action="store_true", help="Fuzz the public decoder.")
    args, rest = parser.parse_known_args()
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: pip install -e .[fuzz]")
    decode = decode_image if args.firewall else _decode_image
    warnings.simplefilter("ignore")

    def one_input(data: bytes) -> None:
        # ImageReadError is the one allowed outcome for a bad file; anything else crashes.
        with contextlib.suppress(ImageReadError):
            decode(data, CONFIG)

    corpus = args.corpus or Path(tempfile.mkdtemp(prefix="pneumoscan-fuzz-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in fuzzcorpus.seed_corpus().items():
        (corpus / name).write_bytes(data)
    print(f"seed corpus in {corpus}; fuzzing for {args.seconds} s", flush=True)
    atheris.instrument_all()
    argv = [
        sys.argv[0],
        *rest,
        f"-max_total_time={args.seconds}",
        "-rss_limit_mb=2048",
        str(corpus),
    ]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
