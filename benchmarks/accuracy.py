"""Train the default recipe with several seeds; print validation and site-sample figures.

Usage:
    python benchmarks/accuracy.py [--arch efficientnet_lite0] [--seeds 42 43 44] [--out runs/acc]

Not a test: each seed is a full training run (about 15-20 minutes on 2 cores). The site sample
(../shared/data/site_sample) comes from another acquisition than the training data; the
validation split comes from the training data and is the optimistic figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pandas as pd
from common import SHARED_DATA, machine

from pneumoscan.evaluate.scoring import evaluate
from pneumoscan.train.loop import TrainOptions, train


def _site_figures(model: Path) -> dict[str, float]:
    metrics = evaluate(SHARED_DATA / "site_sample", model, plot_path=None)
    return {k: metrics[k] for k in ("auc", "sensitivity", "specificity", "ece")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy"))
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rows = []
    for seed in args.seeds:
        out = args.out / f"{args.arch}-seed{seed}"
        if not (out / "model.keras").exists():
            train(TrainOptions(data=str(SHARED_DATA / "chest_xray"), out=str(out), arch=args.arch,
                               seed=seed, epochs=args.epochs))  # fmt: skip
        # Summed epoch times from the run's history: right for earlier or resumed runs too.
        wall = float(pd.read_csv(out / "history.csv")["seconds"].sum())
        val = json.loads((out / "metrics.json").read_text())["validation"]
        site = _site_figures(out / "model.keras")
        rows.append({"seed": seed, "wall_s": wall, "val": val, "site": site})
        print(
            f"seed {seed}: epochs {wall / 60:.1f} min | validation AUC {val['auc']:.4f} "
            f"sens {val['sensitivity']:.3f} spec {val['specificity']:.3f} ECE {val['ece']:.3f} | "
            f"site AUC {site['auc']:.4f} sens {site['sensitivity']:.3f} "
            f"spec {site['specificity']:.3f} ECE {site['ece']:.3f}",
            flush=True,
        )
    aucs = [row["site"]["auc"] for row in rows]
    print(f"site-sample AUC spread (max - min) over {len(rows)} seeds: {max(aucs) - min(aucs):.4f}")
    if len(aucs) > 1:
        print(f"site-sample AUC mean {statistics.mean(aucs):.4f} sd {statistics.stdev(aucs):.4f}")


if __name__ == "__main__":
    main()
