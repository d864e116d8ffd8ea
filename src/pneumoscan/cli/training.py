"""`pneumoscan train`, `calibrate` and `fit-ood`: making and adapting models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pneumoscan.cli.common import (
    ModelOption,
    _fail,
    _fmt,
    stderr,
    stdout,
)
from pneumoscan.constants import (
    DEFAULT_BACTERIAL_SENSITIVITY,
    DEFAULT_SEED,
    DEFAULT_SITE_TARGET_SENSITIVITY,
    DEFAULT_TARGET_SENSITIVITY,
    DEFAULT_VAL_FRACTION,
)
from pneumoscan.formatting import format_threshold
from pneumoscan.jsonio import write_json
from pneumoscan.progress import Reporter


def train(
    data: Annotated[
        Path, typer.Option("--data", help="Dataset root (train/ [val/]) or class folder root.")
    ],
    out: Annotated[Path, typer.Option(help="Run folder to write.")] = Path("runs/latest"),
    arch: Annotated[
        str, typer.Option(help="Registered architecture (see `pneumoscan models`).")
    ] = "seed",
    epochs: Annotated[int | None, typer.Option(help="Default: the architecture's recipe.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Default: the recipe's.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Default: the recipe's.")] = None,
    seed: Annotated[
        int, typer.Option(help="Seed for the split, shuffling and weights.")
    ] = DEFAULT_SEED,
    val_fraction: Annotated[
        float,
        typer.Option(help="Share of training patients held out when val/ is missing or tiny."),
    ] = DEFAULT_VAL_FRACTION,
    max_images: Annotated[
        int | None,
        typer.Option(help="Train on about this many images (whole patients), for quick runs."),
    ] = None,
    augment: Annotated[
        str | None,
        typer.Option(
            help="Augmentation: none, xray, or xray_border (xray plus border masking, the "
            "shipped recipe's; default: the recipe's)."
        ),
    ] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Default: the recipe's.")] = None,
    precision: Annotated[
        str | None,
        typer.Option(help="float32 or mixed_bfloat16 while training. Default: the recipe's."),
    ] = None,
    intensity: Annotated[
        str | None,
        typer.Option(help="Intensity normalisation: none or equalize (default: the arch's)."),
    ] = None,
    batchnorm: Annotated[
        str | None,
        typer.Option(help="Batch norm while training: trainable or frozen (default: recipe's)."),
    ] = None,
    select_on: Annotated[
        str | None,
        typer.Option(help="Epoch kept: best val_auc or val_loss (default: the recipe's)."),
    ] = None,
    frozen_blocks: Annotated[
        int | None,
        typer.Option(help="Keep the stem and this many first blocks pretrained (default: recipe)."),
    ] = None,
    subtype_weight: Annotated[
        float | None,
        typer.Option(help="Loss weight of the bacterial-or-viral head; 0: none (default: recipe)."),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(help="Distil from these model files (comma-separated; their mean)."),
    ] = None,
    distill_weight: Annotated[
        float, typer.Option(help="Weight of the teachers' scores in the target, in (0, 1].")
    ] = 0.5,
    keep_checkpoints: Annotated[
        bool, typer.Option(help="Keep every epoch's network in checkpoints/epoch-N.keras.")
    ] = False,
    target_sensitivity: Annotated[
        float, typer.Option(help="Validation sensitivity the operating threshold is chosen for.")
    ] = DEFAULT_TARGET_SENSITIVITY,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")
    ] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Decoded-image cache (default: $PNEUMOSCAN_CACHE or ~/.cache/pneumoscan)."
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Decode every image into memory; no cache.")
    ] = False,
) -> None:
    """Train a model; checkpoints every epoch and writes config, history, curves and model."""
    from pneumoscan.models import list_models  # lazy: the CLI loads only what a command runs
    from pneumoscan.train.loop import PRECISIONS, TrainOptions  # lazy: loads pandas
    from pneumoscan.train.loop import train as run_training  # lazy: loads pandas

    if arch not in list_models():
        _fail(f"unknown architecture {arch!r}; choose one of {list_models()}")
    if precision is not None and precision not in PRECISIONS:
        _fail(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    options = TrainOptions(
        data=str(data), out=str(out), arch=arch, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, seed=seed, val_fraction=val_fraction,
        max_images=max_images, augment=augment, label_smoothing=label_smoothing,
        precision=precision, intensity=intensity, batchnorm=batchnorm, select_on=select_on,
        frozen_blocks=frozen_blocks, subtype_weight=subtype_weight, teacher=teacher,
        distill_weight=distill_weight, keep_checkpoints=keep_checkpoints,
        target_sensitivity=target_sensitivity, resume=resume,
    )  # fmt: skip
    result = run_training(options, Reporter(stderr), cache_dir=cache_dir, use_cache=not no_cache)
    val = result.validation
    stdout.print(
        f"validation (patient-grouped split of the training data, not a test score): "
        f"AUC {_fmt(val['auc'])}, sensitivity {_fmt(val['sensitivity'])}, "
        f"specificity {_fmt(val['specificity'])} at threshold {format_threshold(val['threshold'])}"
    )
    stdout.print(
        f"model: {result.model_path}  ({result.epochs_run} epochs, {result.seconds:.0f} s)"
    )
    if result.skipped:
        stdout.print(f"{len(result.skipped)} unreadable images skipped (see {out / 'skipped.csv'})")


def fit_ood_command(
    data: Annotated[
        Path, typer.Option("--data", help="The data set the model was trained on (not test).")
    ],
    out: Annotated[Path, typer.Option(help="Model file to write, with the OOD detector.")],
    model: ModelOption = None,
    check: Annotated[
        list[Path] | None,
        typer.Option(help="Folder of X-rays that must pass (e.g. another site's); repeatable."),
    ] = None,
    retention: Annotated[
        float, typer.Option(help="Share of the training images the detector must accept.")
    ] = 0.995,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
) -> None:
    """Fit the out-of-distribution detector on the model's training images and store it."""
    from pneumoscan.inference.ood_fit import fit_ood  # lazy: loads pandas

    ood = fit_ood(
        model, data, out, check or [], retention, batch_size=batch_size,
        reporter=Reporter(stderr),
    )  # fmt: skip
    fitted, rates = ood["fitted_on"], ood["training_rejection"]
    stdout.print(
        f"fitted on {fitted['n_images']} images of {fitted['n_patients']} patients "
        f"(layers {', '.join(ood['layers']) or 'none'}); training images rejected: "
        f"{rates['out_of_fold']:.2%} out of fold, {rates['in_sample']:.2%} in sample",
        highlight=False,
    )
    for folder, found in ood["checks"].items():
        stdout.print(
            f"check {folder}: {found['rejected']} of {found['n']} rejected", highlight=False
        )
        for item in found["rejected_files"]:
            stdout.print(f"  {item['path']}: {item['reason']}", highlight=False)
    stdout.print(f"wrote {out}")


def _figures_row(name: str, figures: dict[str, Any]) -> list[str]:
    def with_ci(key: str) -> str:
        low, high = figures[f"{key}_ci"]
        return f"{_fmt(figures[key])} ({_fmt(low)}-{_fmt(high)})"

    threshold = format_threshold(figures["threshold"]) if "threshold" in figures else "per fold"
    return [name, threshold, with_ci("sensitivity"), with_ci("specificity"), _fmt(figures["ece"])]


def calibrate(
    data: Annotated[
        Path, typer.Option("--data", help="Labelled local sample: NORMAL/ PNEUMONIA/.")
    ],
    out: Annotated[Path, typer.Option(help="Calibrated model file to write.")],
    model: ModelOption = None,
    target_sensitivity: Annotated[
        float,
        typer.Option(help="Sensitivity new images of the site should get."),
    ] = DEFAULT_SITE_TARGET_SENSITIVITY,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures.")] = None,
    unlabelled: Annotated[
        Path | None,
        typer.Option(help="Site X-rays without labels: re-estimate batch-norm statistics first."),
    ] = None,
    confidence: Annotated[
        float | None,
        typer.Option(
            help="One-sided confidence with which the sample's sensitivity must reach the "
            "target (0.5 = no margin). Default: the least that kept the target in 95% of "
            "patient splits of the sample."
        ),
    ] = None,
    onnx: Annotated[
        bool, typer.Option(help="Write the ONNX export beside --out (predict's fast path).")
    ] = True,
    refit_head: Annotated[
        bool,
        typer.Option(
            help="Refit the final layer on the site's and the model's training features (kept "
            "only when patient-grouped cross-validation says it helps)."
        ),
    ] = True,
    train_data: Annotated[
        Path | None,
        typer.Option(help="Training data for the head refit if the model carries no features."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace --out and its ONNX export if they exist.")
    ] = False,
    subtype: Annotated[
        bool,
        typer.Option(
            help="Also refit the bacterial-or-viral estimate's calibration and threshold on the "
            "sample's pneumonias whose file names say bacteria or virus."
        ),
    ] = False,
    subtype_target: Annotated[
        float, typer.Option(help="Bacterial sensitivity the subtype call should keep.")
    ] = DEFAULT_BACTERIAL_SENSITIVITY,
) -> None:
    """Adapt a model to a site's labelled sample: final layer, calibration, threshold.

    The figures it prints are the promise: the expected row is what new images of the site
    should get, checked on many patient splits of the sample.
    """
    from pneumoscan.train.site import calibrate_to_site  # lazy: loads SciPy

    result = calibrate_to_site(
        model, data, out, target_sensitivity, reporter=Reporter(stderr),
        unlabelled=unlabelled, confidence=confidence, export=onnx,
        refit_head=refit_head, train_data=train_data, overwrite=overwrite,
        subtype=subtype, subtype_target=subtype_target,
    )  # fmt: skip
    table = Table(
        title=f"Site calibration on {data} (n={result['n']}, {result['n_pneumonia']} pneumonia)"
    )
    for column in ("", "threshold", "sensitivity (95% CI)", "specificity (95% CI)", "ECE"):
        table.add_column(column)
    table.add_row(*_figures_row("before", result["before"]))
    table.add_row(*_figures_row("after, on the sample itself", result["after"]))
    cv = result["cross_validated"]
    if cv:
        name = f"expected on new images ({cv['repeats']}x {cv['folds']}-fold cross-validated)"
        table.add_row(*_figures_row(name, cv))
    stdout.print(table)
    if cv and cv["per_subtype"]:
        stdout.print(
            "expected sensitivity per subtype: "
            + "; ".join(
                f"{kind} {_fmt(f['sensitivity'])} ({_fmt(f['sensitivity_ci'][0])}-"
                f"{_fmt(f['sensitivity_ci'][1])}, n={f['n']})"
                for kind, f in cv["per_subtype"].items()
            ),
            highlight=False,
        )
    chosen = result["promise"]["chosen"]
    stdout.print(
        f"promise: sensitivity >= {target_sensitivity} on new patients. Fitted on one half of "
        f"the sample's patients and checked on the other, this rule ({result['confidence_rule']}"
        f": one-sided {result['confidence']:.0%} bound) fell short in "
        f"{chosen['failure_rate']:.1%} of {chosen['splits']} splits (allowed: "
        f"{result['promise']['max_failure_rate']:.0%}); per subtype: "
        + ", ".join(f"{kind} {f['failure_rate']:.1%}" for kind, f in chosen["per_subtype"].items()),
        highlight=False,
    )
    head = result["head_refit"]
    refitted = bool(head) and head["chosen"] != "original"
    layer = f"refitted (site weight {head['chosen']})" if refitted else "kept"
    written = f"{out}" + (f" and {result['onnx']}" if result.get("onnx") else "")
    stdout.print(
        f"final layer: {layer}; temperature {result['temperature']:.3f}, "
        f"logit bias {result['logit_bias']:+.3f}, "
        f"threshold {format_threshold(result['threshold'])}; wrote {written}",
        highlight=False,
    )
    if result.get("subtype"):
        _print_subtype(result["subtype"])
    stdout.print(
        "The 'on the sample itself' row is optimistic: the threshold was chosen on those images "
        "(scored here as predict scores them). The 'expected' row estimates how the same "
        "procedure does on new images of this site, by refitting without each held-out patient."
    )
    if json_out:
        write_json(json_out, result)


def _print_subtype(found: dict[str, Any]) -> None:
    """The subtype refit's promise: bacterial sensitivity and viral specificity."""
    table = Table(
        title=f"Subtype estimate (estimate, not a microbiological diagnosis): "
        f"{found['n_bacterial']} bacterial, {found['n_viral']} viral pneumonias"
    )
    for column in ("", "threshold", "bacterial sensitivity (95% CI)", "viral specificity", "ECE"):
        table.add_column(column)
    table.add_row(*_figures_row("after, on the sample itself", found["after"]))
    cv = found["cross_validated"]
    if cv:
        name = f"expected on new images ({cv['repeats']}x {cv['folds']}-fold cross-validated)"
        table.add_row(*_figures_row(name, cv))
    stdout.print(table)
    chosen = found["promise"]["chosen"]
    stdout.print(
        f"subtype promise: bacterial sensitivity >= {found['target_bacterial_sensitivity']}; "
        f"this rule ({found['confidence_rule']}: one-sided {found['confidence']:.0%} bound) "
        f"fell short in {chosen['failure_rate']:.1%} of {chosen['splits']} patient splits; "
        f"threshold {format_threshold(found['threshold'])} on P(bacterial) = 1 - P(viral)",
        highlight=False,
    )
