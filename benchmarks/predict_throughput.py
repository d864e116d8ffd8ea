"""Prediction throughput of Keras, ONNX Runtime float32 and int8, beside each network alone.

Usage:
    python benchmarks/predict_throughput.py FOLDER [--model M] [--onnx FILE] [--int8 FILE]
        [--backends keras onnx int8] [--limit N] [--rounds 2] [--profile]

``--int8`` defaults to the int8 export saved beside the model (the shipped model has one;
``pneumoscan export --quantize int8`` makes one); ``--onnx`` to a float32 export made now.
For each backend and round it runs what ``pneumoscan predict`` runs
(:meth:`Predictor.predict_files`: decoding, cheap checks, forward pass, OOD detector, records)
over the files, and then the network-only bound: the same images decoded beforehand, only the
forward pass timed, in batches of ``--batch-size``. It prints both in wall-clock and CPU-time
images/s and the ratio of predict to the bound (issue 20's goal: the default int8 predict at
500 images/s or more on 2 cores). On a shared machine the wall-clock figures depend on the
other load; CPU time (all threads of this process) much less. ``--profile`` prints where
predict's main thread spends its time (cProfile, int8 or the first backend).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from pathlib import Path

import numpy as np
from common import machine

from pneumoscan.data.preprocess import decode_image
from pneumoscan.inference.export import export_onnx
from pneumoscan.inference.predict import expand_inputs
from pneumoscan.inference.predictor import Predictor
from pneumoscan.models.modelfile import resolve_model_path


def timed(run: object) -> tuple[float, float, object]:
    """Wall and CPU seconds of ``run()``, and what it returned."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()  # type: ignore[operator]
    return time.perf_counter() - wall, time.process_time() - cpu, result


def network_only(predictor: Predictor, pixels: np.ndarray, batch_size: int) -> tuple[float, float]:
    """Wall and CPU seconds of the forward pass alone over decoded ``pixels``."""
    scorer = predictor.scorer(ood_check=True)
    wall, cpu, _ = timed(
        lambda: [
            scorer.forward(pixels[start : start + batch_size])
            for start in range(0, len(pixels), batch_size)
        ]
    )
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--model")
    parser.add_argument("--onnx", help="exported float32 ONNX file (default: export now)")
    parser.add_argument("--int8", help="int8 ONNX file (default: the one beside the model)")
    parser.add_argument("--backends", nargs="+", default=["keras", "onnx", "int8"])
    parser.add_argument("--limit", type=int, help="score only the first N files")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    files, _ = expand_inputs([args.folder])
    files = files[: args.limit] if args.limit else files
    model_path = resolve_model_path(args.model)
    predictors: dict[str, Predictor] = {}
    if "keras" in args.backends:
        predictors["keras"] = Predictor.open(model_path, "keras")
    if "onnx" in args.backends:
        onnx_path = Path(args.onnx or "/tmp/pneumoscan-throughput.onnx")
        if not args.onnx:
            export_onnx(model_path, onnx_path, overwrite=True)
        predictors["onnx"] = Predictor.open(onnx_path)
    int8_path = Path(args.int8) if args.int8 else model_path.with_suffix(".int8.onnx")
    if "int8" in args.backends and int8_path.is_file():
        predictors["int8"] = Predictor.open(int8_path)
    elif "int8" in args.backends:
        print(f"no int8 export at {int8_path}: int8 not measured")
    config = next(iter(predictors.values())).model.preprocess
    pixels = np.stack([decode_image(path, config).pixels for path in files])
    print(f"{machine()}; {len(files)} files in {args.folder}; model {model_path.name}")
    n = len(files)
    for round_ in range(1, args.rounds + 1):
        for backend, predictor in predictors.items():
            load = os.getloadavg()[0]
            wall, cpu, results = timed(lambda p=predictor: list(p.predict_files(files)))
            ok = sum(r.status == "ok" for r in results)  # type: ignore[attr-defined]
            bound_wall, bound_cpu = network_only(predictor, pixels, args.batch_size)
            print(
                f"round {round_} {backend:5s}: predict {n / wall:6.1f} images/s wall "
                f"({n / cpu:6.1f} per CPU-second); network alone {n / bound_wall:6.1f} "
                f"images/s wall ({n / bound_cpu:6.1f} per CPU-second); predict/bound "
                f"{bound_wall / wall:.2f} wall, {bound_cpu / cpu:.2f} CPU; {ok} ok; "
                f"load average {load:.1f}"
            )
    if args.profile:
        predictor = predictors.get("int8") or next(iter(predictors.values()))
        profile = cProfile.Profile()
        profile.runcall(lambda: list(predictor.predict_files(files)))
        print("predict's main thread (the decoding threads are not profiled):")
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
