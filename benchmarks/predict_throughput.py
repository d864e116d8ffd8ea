"""Prediction throughput of Keras, ONNX Runtime float32 and int8 on a folder of X-rays.

Usage:
    python benchmarks/predict_throughput.py FOLDER [--model M] [--onnx FILE] [--int8 FILE]
        [--rounds 2]

``--int8`` defaults to the int8 export saved beside the model (the shipped model has one;
``pneumoscan export --quantize int8`` makes one). Runs ``predict_files`` (what ``pneumoscan
predict`` runs: decoding, cheap checks, forward pass, OOD detector) over the whole folder,
alternating backends, and prints wall-clock and CPU-time images/s per round. On a shared
machine the wall-clock figure depends on the other load; the CPU-time figure (all threads of
this process) much less so.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import machine

from pneumoscan.inference.export import export_onnx
from pneumoscan.inference.predict import expand_inputs, load_detector, predict_files
from pneumoscan.inference.scorer import load_onnx_model
from pneumoscan.models.modelfile import load_model, resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--model")
    parser.add_argument("--onnx", help="exported ONNX file (default: export now)")
    parser.add_argument("--int8", help="int8 ONNX file (default: the one beside the model)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    files, _ = expand_inputs([args.folder])
    model_path = resolve_model_path(args.model)
    onnx_path = Path(args.onnx or "/tmp/pneumoscan-throughput.onnx")
    if not args.onnx:
        export_onnx(model_path, onnx_path)
    models = {"keras": load_model(model_path), "onnx": load_onnx_model(onnx_path)}
    int8_path = Path(args.int8) if args.int8 else model_path.with_suffix(".int8.onnx")
    if int8_path.is_file():
        models["int8"] = load_onnx_model(int8_path)
    else:
        print(f"no int8 export at {int8_path}: int8 not measured")
    print(f"{machine()}; {len(files)} files in {args.folder}; model {model_path.name}")
    for round_ in range(1, args.rounds + 1):
        for backend, model in models.items():
            detector = load_detector(model)
            load = os.getloadavg()[0]
            wall, cpu = time.perf_counter(), time.process_time()
            results = list(predict_files(model, files, args.batch_size, detector=detector))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            ok = sum(r["status"] == "ok" for r in results)
            print(
                f"round {round_} {backend:5s}: {len(files) / wall:6.1f} images/s wall "
                f"({wall:.1f} s), {len(files) / cpu:6.1f} images per CPU-second; "
                f"{ok} ok; load average {load:.1f}"
            )


if __name__ == "__main__":
    main()
