"""Train a registered architecture on a dataset folder, with checkpoints and resume.

A run folder holds everything needed to reproduce or continue it: ``config.json`` (options,
resolved recipe, preprocessing, split, data fingerprint, versions), ``split.csv``,
``skipped.csv``, ``history.csv``, ``training_curves.png``, ``checkpoints/`` and, at the end,
``model.keras`` (with metadata) and ``metrics.json``.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumoscan.constants import (
    CLASSES,
    DEFAULT_BACTERIAL_SENSITIVITY,
    DEFAULT_SEED,
    DEFAULT_TARGET_SENSITIVITY,
    DEFAULT_VAL_FRACTION,
)
from pneumoscan.data.cache import cached_decode
from pneumoscan.data.dataset import (
    assign_validation_split,
    data_fingerprint,
    empty_classes,
    patients_in_several_splits,
    scan_dataset,
)
from pneumoscan.data.pipeline import SecondTask, decode_all, make_tf_dataset, steps_per_epoch
from pneumoscan.data.preprocess import PreprocessConfig
from pneumoscan.errors import (
    DatasetError,
    InvalidInputError,
    ModelFileError,
    OutputExistsError,
    PneumoscanError,
)
from pneumoscan.inference.calibration import fit_operating_point
from pneumoscan.inference.subtype import fit_subtype_point
from pneumoscan.jsonio import write_json
from pneumoscan.models import Recipe, create_model, get_spec
from pneumoscan.models.modelfile import (
    VALIDATION_SPLIT,
    OperatingPoint,
    library_versions,
    load_model,
    now_utc,
    save_model,
)
from pneumoscan.models.subtype import (
    SUBTYPE_HEAD,
    SubtypeHead,
    subtype_targets,
    with_subtype_head,
)
from pneumoscan.progress import Reporter

PRECISIONS = ("float32", "mixed_bfloat16")

# Options that may differ when a run is resumed (a run folder may be moved; the target
# sensitivity only sets the final operating point); everything else must match the saved run.
_RESUMABLE_CHANGES = {"resume", "epochs", "out", "target_sensitivity", "keep_checkpoints"}


@dataclass
class TrainOptions:
    """What ``pneumoscan train`` was asked to do (saved as ``config.json["options"]``).

    ``None`` for ``epochs``, ``batch_size``, ``learning_rate`` and the other recipe fields means
    the architecture's recipe. ``teacher`` is a comma-separated list of model files whose mean
    raw P(pneumonia) on the (unaugmented) training images becomes part of the target:
    ``(1 - distill_weight) * label + distill_weight * teacher`` (knowledge distillation).
    ``keep_checkpoints`` keeps every epoch's network as ``checkpoints/epoch-N.keras``.
    """

    data: str
    out: str
    arch: str = "seed"
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    seed: int = DEFAULT_SEED
    val_fraction: float = DEFAULT_VAL_FRACTION
    max_images: int | None = None
    augment: str | None = None
    label_smoothing: float | None = None
    precision: str | None = None
    intensity: str | None = None
    batchnorm: str | None = None
    select_on: str | None = None
    frozen_blocks: int | None = None
    subtype_weight: float | None = None
    teacher: str | None = None
    distill_weight: float = 0.5
    keep_checkpoints: bool = False
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    resume: bool = False


@dataclass
class TrainResult:
    """Where the model went and what it scored on the validation split."""

    model_path: Path
    validation: dict[str, Any]
    epochs_run: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)


def resolve_recipe(options: TrainOptions) -> Recipe:
    """The architecture's recipe with the CLI's overrides applied."""
    recipe = get_spec(options.arch).recipe
    overrides: dict[str, Any] = {
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "learning_rate": options.learning_rate,
        "augment": options.augment,
        "label_smoothing": options.label_smoothing,
        "precision": options.precision,
        "batchnorm": options.batchnorm,
        "select_on": options.select_on,
        "frozen_blocks": options.frozen_blocks,
        "subtype_weight": options.subtype_weight,
    }
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    try:
        recipe.validate()
    except ValueError as exc:
        raise PneumoscanError(str(exc)) from None
    return recipe


def resolve_preprocess(options: TrainOptions) -> PreprocessConfig:
    """The architecture's preprocessing with the CLI's overrides applied."""
    preprocess = get_spec(options.arch).preprocess
    try:
        if options.intensity is not None:
            preprocess = replace(preprocess, intensity=options.intensity)
        preprocess.validate()
    except ValueError as exc:  # the config's own check: one `error:` line, not a traceback
        raise InvalidInputError(str(exc)) from None
    return preprocess


def options_to_command(options: TrainOptions) -> str:
    """The ``pneumoscan train`` command line that reproduces these options."""
    words = ["pneumoscan", "train"]
    for name, value in asdict(options).items():
        flag = "--" + name.replace("_", "-")
        if name == "resume" or value is None or value is False:
            continue
        if name == "distill_weight" and not options.teacher:
            continue  # meaningless without a teacher
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def _subsample(table: pd.DataFrame, max_images: int, seed: int) -> pd.DataFrame:
    """Keep about ``max_images`` images, whole patients at a time, classes in proportion."""
    patients = table.groupby("patient_id")["label"].first()
    share = min(1.0, max_images / len(table))
    chosen = patients.groupby(patients).sample(frac=share, random_state=seed).index
    return table[table["patient_id"].isin(chosen)].reset_index(drop=True)


def prepare_split(options: TrainOptions, reporter: Reporter) -> pd.DataFrame:
    """Scan the data, drop unreadable files, and carve the patient-grouped validation split.

    Raises:
        DatasetError: A class has no readable image in train or validation.
    """
    table = scan_dataset(options.data)
    table = table[table["split"].isin(["train", "val", "all"])].reset_index(drop=True)
    if table.empty:
        raise DatasetError(f"{options.data}: no train/ images (test/ is never used for training)")
    for path, error in table.loc[table["error"] != "", ["path", "error"]].itertuples(index=False):
        reporter.warn(f"skipped {error if error.startswith(path) else f'{path}: {error}'}")
    missing = empty_classes(table)
    if missing:
        raise DatasetError(f"{options.data}: no readable training images for class(es) {missing}")
    if options.max_images:
        table = _subsample(table, options.max_images, options.seed)
    table = assign_validation_split(table, options.val_fraction, options.seed)
    shared = patients_in_several_splits(table)
    if shared:  # guarded by construction; a failure here is a bug, not a data problem.
        raise PneumoscanError(f"patients in two splits after splitting: {list(shared)[:5]}")
    for split in ("train", "val"):
        if empty_classes(table[table["split"] == split]):
            raise DatasetError(f"{options.data}: the {split} split lacks a class; add images")
    return table


#: Fewest validation images per class for a threshold the split can support: the threshold is
#: chosen for a sensitivity on the pneumonia images, and checked for specificity on the normal.
MIN_VAL_PNEUMONIA = 50
MIN_VAL_NORMAL = 20


def small_validation_warning(n_pneumonia: int, n_normal: int) -> str | None:
    """Why a validation split is too small to choose the operating threshold, or ``None``.

    With few pneumonia images each one moves the measured sensitivity by several points, so
    the threshold chosen for the target sensitivity is mostly noise; with few normal images
    its specificity is unknown.
    """
    if n_pneumonia >= MIN_VAL_PNEUMONIA and n_normal >= MIN_VAL_NORMAL:
        return None
    return (
        f"the validation split has {n_pneumonia} pneumonia and {n_normal} normal images "
        f"(fewer than {MIN_VAL_PNEUMONIA} pneumonia or {MIN_VAL_NORMAL} normal): the operating "
        "threshold chosen on it is unreliable. Use more training data or a larger "
        "--val-fraction, or set the threshold on a labelled sample of your own site with "
        "`pneumoscan calibrate`"
    )


def _class_weights(labels: np.ndarray, mode: str) -> dict[int, float] | None:
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=2)
    return {k: float(len(labels) / (2 * counts[k])) for k in range(2)}


def _build_optimizer(recipe: Recipe, total_steps: int) -> Any:
    import keras  # lazy: loads TensorFlow

    config: dict[str, Any] = {}
    if recipe.schedule == "cosine":
        initial = recipe.learning_rate or 1e-3
        config["learning_rate"] = keras.optimizers.schedules.CosineDecay(initial, total_steps)
    elif recipe.schedule != "constant":
        raise InvalidInputError(f"unknown schedule {recipe.schedule!r} (constant or cosine)")
    elif recipe.learning_rate is not None:
        config["learning_rate"] = recipe.learning_rate
    return keras.optimizers.get({"class_name": recipe.optimizer, "config": config})


@contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Keras's global dtype policy set to ``name`` inside the block, restored after it."""
    import keras  # lazy: loads TensorFlow

    if name not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {name!r}; choose one of {PRECISIONS}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _build_loss(recipe: Recipe) -> Any:
    import keras  # lazy: loads TensorFlow

    if recipe.label_smoothing and recipe.loss == "binary_crossentropy":
        return keras.losses.BinaryCrossentropy(label_smoothing=recipe.label_smoothing)
    return recipe.loss


class _RunFolder:
    """Paths inside a run folder."""

    def __init__(self, out: str | Path) -> None:
        self.root = Path(out)
        self.config = self.root / "config.json"
        self.split = self.root / "split.csv"
        self.skipped = self.root / "skipped.csv"
        self.history = self.root / "history.csv"
        self.curves = self.root / "training_curves.png"
        self.checkpoints = self.root / "checkpoints"
        self.last = self.checkpoints / "last.keras"
        self.best = self.checkpoints / "best.keras"
        self.state = self.checkpoints / "state.json"
        self.model = self.root / "model.keras"
        self.metrics = self.root / "metrics.json"


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a ``config.json`` that ``pneumoscan train`` wrote."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    options = config.get("options") if isinstance(config, dict) else None
    return isinstance(options, dict) and {"data", "arch", "seed"} <= options.keys()


def _check_fresh_folder(run: _RunFolder) -> None:
    """Refuse to start a run over files it did not write (issue 22).

    A folder may be new, empty or hold unrelated files; a run that stopped before its first
    checkpoint (its own ``config.json``, no model) starts again. Anything else the run would
    write over (a finished run whose checkpoints were removed, a user's ``config.json`` or
    ``history.csv``) is refused, naming the files.
    """
    if run.model.exists():
        raise OutputExistsError(
            f"{run.root} holds a finished model ({run.model.name}) and no checkpoint to resume "
            "from; choose another --out (a run never replaces a model it did not train)"
        )
    ours = run.config.exists() and _is_run_config(run.config)
    written = (run.config, run.split, run.skipped, run.history, run.curves, run.metrics)
    theirs = [p.name for p in written if p.exists() and not ours]
    if run.checkpoints.exists() and not ours:
        theirs.append(f"{run.checkpoints.name}/")
    if theirs:
        raise OutputExistsError(
            f"{run.root} is not a pneumoscan run folder and holds {', '.join(theirs)}, which "
            "training would overwrite; choose another --out (a new or empty folder)"
        )


def _check_resume(run: _RunFolder, options: TrainOptions) -> dict[str, Any] | None:
    """Return the saved state when resuming; refuse to overwrite a run, or a user's files,
    silently."""
    if not run.state.exists():
        if options.resume and run.config.exists():
            raise PneumoscanError(f"{run.root}: no checkpoint yet; start again without --resume")
        _check_fresh_folder(run)
        return None
    if not options.resume:
        raise PneumoscanError(
            f"{run.root} already holds a training run; pass --resume to continue it "
            "or choose another --out"
        )
    saved = json.loads(run.config.read_text())["options"]
    current = asdict(options)
    changed = [k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if changed:
        raise PneumoscanError(f"--resume with different options {changed}; use the saved ones")
    state: dict[str, Any] = json.loads(run.state.read_text())
    return state


def train(
    options: TrainOptions,
    reporter: Reporter | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> TrainResult:
    """Train, checkpoint every epoch, and save the final model with its metadata.

    Args:
        options: What to train and where to write it.
        reporter: Progress and warnings sink (silent when ``None``).
        cache_dir: Root of the decoded-image cache (default:
        :func:`pneumoscan.data.cache.cache_root`).
        use_cache: ``False`` decodes every image into memory instead of using the cache.

    Raises:
        DatasetError: The data cannot support training.
        PneumoscanError: The run folder conflicts with ``--resume``.
    """
    import keras  # lazy: loads TensorFlow

    reporter = reporter or Reporter(quiet=True)
    started = time.perf_counter()
    run = _RunFolder(options.out)
    state = _check_resume(run, options)
    recipe = resolve_recipe(options)
    preprocess = resolve_preprocess(options)
    keras.utils.set_random_seed(options.seed)

    table = prepare_split(options, reporter)
    run.root.mkdir(parents=True, exist_ok=True)
    table[["path", "label", "split", "patient_id", "subtype"]].to_csv(run.split, index=False)
    pixels, labels, skipped, table = _decode_splits(
        table, preprocess, reporter, cache_dir, use_cache
    )
    pd.DataFrame(skipped, columns=["path", "error"]).to_csv(run.skipped, index=False)
    config = _run_config(options, recipe, preprocess.to_dict(), table)
    if state is None:
        write_json(run.config, config)

    is_train = (table["split"] == "train").to_numpy()
    train_x, train_y = _rows(pixels, is_train), labels[is_train]
    val_x, val_y = _rows(pixels, ~is_train), labels[~is_train]
    subtypes = table["subtype"].to_numpy()
    second = _subtype_task(recipe, train_y, subtypes[is_train], reporter)
    reporter.info(
        f"train {len(train_y)} images ({int(train_y.sum())} pneumonia), "
        f"val {len(val_y)} ({int(val_y.sum())} pneumonia), {table['patient_id'].nunique()} patients"
    )
    small = small_validation_warning(int(val_y.sum()), int(len(val_y) - val_y.sum()))
    if small:
        reporter.warn(small)

    # lazy: loads TensorFlow
    from pneumoscan.data.augment import build_augmenter, unwrap, wrap_for_training

    steps = steps_per_epoch(len(train_y), recipe.batch_size)
    with dtype_policy(recipe.precision):
        if state is None:
            augmenter = build_augmenter(recipe.augment, options.seed)
            backbone = create_model(options.arch)
            if recipe.batchnorm == "frozen":
                freeze_batch_norm(backbone)
            if recipe.frozen_blocks:
                freeze_early_blocks(backbone, recipe.frozen_blocks)
            if second is not None:
                backbone = with_subtype_head(backbone)
            network = wrap_for_training(backbone, augmenter)
            optimizer = _build_optimizer(recipe, recipe.epochs * steps)
            if second is None:
                network.compile(optimizer, loss=_build_loss(recipe), metrics=["accuracy"])
            else:
                network.compile(
                    optimizer,
                    loss=[_build_loss(recipe), "binary_crossentropy"],
                    loss_weights=[1.0, recipe.subtype_weight],
                    metrics=[["accuracy"], []],
                )
            start_epoch = 0
        else:
            network = keras.saving.load_model(run.last)
            start_epoch = int(state["epochs_completed"])
            reporter.info(f"resuming {run.root} after epoch {start_epoch}")

        from pneumoscan.train.callbacks import EpochCheckpoint  # lazy: loads TensorFlow

        checkpoint = EpochCheckpoint(
            run, val_x, val_y, reporter, state, recipe.select_on, options.keep_checkpoints,
            val_subtypes=None if second is None else subtypes[~is_train],
        )  # fmt: skip
        if start_epoch < recipe.epochs:
            targets = _distillation_targets(options, train_x, train_y, reporter)
            dataset = make_tf_dataset(
                train_x, train_y, recipe.batch_size, options.seed, start_epoch, recipe.epochs,
                targets=targets, second=second,
            )  # fmt: skip
            network.fit(
                dataset,
                epochs=recipe.epochs,
                initial_epoch=start_epoch,
                steps_per_epoch=steps,
                # A two-output network carries the class weights as per-image weights.
                class_weight=None if second else _class_weights(train_y, recipe.class_weight),
                callbacks=[reporter.keras_callback(len(train_y), recipe.batch_size), checkpoint],
                shuffle=False,  # the dataset is already shuffled, reproducibly per epoch
                verbose=0,
            )
        if recipe.restore_best and run.best.exists():
            network = keras.saving.load_model(run.best)
            best = f"epoch {checkpoint.best_epoch}, {recipe.select_on} {checkpoint.best_value:.4f}"
            reporter.info(f"restored the best ({best})")
        network = unwrap(network)

    final = _finish(
        network, run, options, recipe, config, (val_x, val_y, subtypes[~is_train]), started,
        reporter,
    )  # fmt: skip
    return TrainResult(
        model_path=run.model,
        validation=final,
        epochs_run=recipe.epochs - start_epoch,
        seconds=time.perf_counter() - started,
        skipped=skipped,
    )


def _subtype_task(
    recipe: Recipe, labels: np.ndarray, subtypes: np.ndarray, reporter: Reporter
) -> SecondTask | None:
    """The subtype head's targets and weights (pneumonia images of named cause only, the two
    causes balanced), or ``None`` when the recipe has no subtype head or, with a warning, when
    the file names name no bacterial or no viral pneumonia (another hospital's data)."""
    if not recipe.subtype_weight:
        return None
    viral, known = subtype_targets(subtypes)
    counts = [int((known & (viral == k)).sum()) for k in (0, 1)]
    if min(counts) == 0:
        reporter.warn(
            "no subtype head: it learns from file names that say bacteria or virus, and the "
            f"training split names {counts[0]} bacterial and {counts[1]} viral pneumonias"
        )
        return None
    balanced = np.where(viral == 1, known.sum() / (2 * counts[1]), known.sum() / (2 * counts[0]))
    weights = np.where(known, balanced, 0.0).astype(np.float32)
    classes = _class_weights(labels, recipe.class_weight) or {0: 1.0, 1: 1.0}
    first = np.array([classes[int(y)] for y in labels], dtype=np.float32)
    return SecondTask(viral, weights, first)


def freeze_batch_norm(network: Any) -> int:
    """Put every batch-norm layer in inference mode for good (Keras 3 semantics of
    ``trainable = False``): pretrained statistics are used and kept, gamma and beta fixed.

    Returns:
        The number of layers frozen.
    """
    from pneumoscan.train.adapt import batch_norm_layers  # lazy: loads TensorFlow

    norms = batch_norm_layers(network)
    for layer in norms:
        layer.trainable = False
    return len(norms)


def freeze_early_blocks(network: Any, blocks: int) -> list[str]:
    """Keep the stem and the first ``blocks`` blocks at their pretrained weights.

    Layers are named ``stem_*`` and ``block{i}_*`` in the registry's EfficientNet-Lite
    networks.

    Returns:
        The names of the layers frozen.

    Raises:
        InvalidInputError: The network has no such blocks.
    """
    prefixes = ("stem_", *(f"block{i}_" for i in range(blocks)))
    frozen = [
        layer
        for layer in network._flatten_layers(include_self=False)
        if layer.name.startswith(prefixes) and layer.weights
    ]
    if not any(layer.name.startswith(f"block{blocks - 1}_") for layer in frozen):
        raise InvalidInputError(f"{network.name} has no block{blocks - 1}: cannot freeze {blocks}")
    for layer in frozen:
        layer.trainable = False
    return [layer.name for layer in frozen]


def _distillation_targets(
    options: TrainOptions, train_x: np.ndarray, train_y: np.ndarray, reporter: Reporter
) -> np.ndarray | None:
    """Soft targets ``(n, 2)`` mixing the labels with the teachers' mean raw P(pneumonia).

    Raises:
        ModelFileError: A teacher cannot be read, or expects another input size.
    """
    if not options.teacher:
        return None
    if not 0.0 < options.distill_weight <= 1.0:
        raise PneumoscanError(f"--distill-weight {options.distill_weight} must be in (0, 1]")
    from pneumoscan.train.callbacks import predict_pixels  # lazy: loads TensorFlow

    teachers = [t.strip() for t in options.teacher.split(",") if t.strip()]
    p_teacher = np.zeros(len(train_y))
    for path in teachers:
        teacher = load_model(path)
        if tuple(teacher.preprocess.image_size) != tuple(train_x.shape[1:3]):
            raise ModelFileError(f"{path}: teacher expects {teacher.preprocess.image_size} images")
        with reporter.task(f"teacher {Path(path).name}", total=1) as advance:
            p_teacher += predict_pixels(teacher.network, train_x) / len(teachers)
            advance(1)
    onehot = np.eye(2, dtype=np.float64)[train_y]
    soft = np.stack([1.0 - p_teacher, p_teacher], axis=1)
    w = options.distill_weight
    return ((1.0 - w) * onehot + w * soft).astype(np.float32)


def _rows(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``pixels[mask]``, as a view (a memory map stays one) when the rows are contiguous."""
    chosen = np.flatnonzero(mask)
    if len(chosen) and chosen[-1] - chosen[0] + 1 == len(chosen):
        return pixels[chosen[0] : chosen[-1] + 1]
    return pixels[mask]


def _decode_splits(
    table: pd.DataFrame,
    preprocess: Any,
    reporter: Reporter,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]], pd.DataFrame]:
    """Decode the readable images, train split first, through the cache if asked.

    Train rows keep their relative order (so batches are unchanged) but come before the
    validation rows, so each split is a contiguous, memory-mapped slice, never a RAM copy.
    """
    table = table[table["error"] == ""]
    table = table.iloc[np.argsort((table["split"] != "train").to_numpy(), kind="stable")]
    table = table.reset_index(drop=True)
    paths = table["path"].tolist()
    with reporter.task("decoding images", total=len(paths)) as advance:
        if not use_cache:
            pixels, kept, errors = decode_all(paths, preprocess, on_progress=advance)
        else:
            pixels, kept, errors = cached_decode(paths, preprocess, cache_dir, advance)
    skipped = [(paths[i], failure.message) for i, failure in errors]
    for _, message in skipped:
        reporter.warn(f"skipped {message}")
    table = table.iloc[kept].reset_index(drop=True)
    labels = (table["label"] == CLASSES[1]).to_numpy().astype(int)
    return pixels, labels, skipped, table


def _run_config(
    options: TrainOptions, recipe: Recipe, preprocess: dict[str, Any], table: pd.DataFrame
) -> dict[str, Any]:
    counts = (table["split"] + "/" + table["label"]).value_counts().sort_index()
    return {
        "options": asdict(options),
        "command": options_to_command(options),
        "recipe": recipe.to_dict(),
        "preprocess": preprocess,
        "classes": list(CLASSES),
        "split": {
            "method": "patient-grouped stratified (StratifiedGroupKFold)",
            "val_fraction": options.val_fraction,
            "seed": options.seed,
            "counts": {str(key): int(n) for key, n in counts.items()},
            "patients": table.groupby("split")["patient_id"].nunique().astype(int).to_dict(),
        },
        "data_fingerprint": data_fingerprint(table),
        "versions": library_versions(),
        "created": now_utc(),
    }


def _finish(
    network: Any,
    run: _RunFolder,
    options: TrainOptions,
    recipe: Recipe,
    config: dict[str, Any],
    validation_data: tuple[np.ndarray, np.ndarray, np.ndarray],
    started: float,
    reporter: Reporter,
) -> dict[str, Any]:
    """Score validation, write the metadata-carrying model, metrics and curves."""
    from pneumoscan.plots import plot_training_curves  # lazy: loads matplotlib
    from pneumoscan.train.callbacks import predict_pixels  # lazy: loads TensorFlow

    # A fresh, never-compiled float32 copy drops the optimizer state (half the file size), any
    # augmentation layers and a mixed-precision policy; the operating point is fitted on what
    # ships.
    val_x, val_y, val_subtypes = validation_data
    shipped = create_model(options.arch)
    subtype: dict[str, Any] = {}
    if len(network.outputs) == 2:
        # The pneumonia network ships alone; the subtype head travels as numbers.
        two = with_subtype_head(shipped)
        two.set_weights(network.get_weights())
        subtype = _fit_subtype(two, val_x, val_subtypes, reporter)
    else:
        shipped.set_weights(network.get_weights())
    fitted = fit_operating_point(
        val_y,
        predict_pixels(shipped, val_x),
        options.target_sensitivity,
        split="val (patient-grouped, from the training data)",
        fitted_on="validation split",
        threshold_rule=(
            f"highest threshold with validation sensitivity >= {options.target_sensitivity}"
        ),
    )
    validation = fitted["validation_metrics"]
    metadata = {
        "arch": options.arch,
        "classes": list(CLASSES),
        "positive_class": CLASSES[1],
        "input_size": list(config["preprocess"]["image_size"]),
        "preprocess": config["preprocess"],
        **OperatingPoint.from_metadata(fitted).to_metadata(),
        "calibration": fitted["calibration"],
        "recipe": recipe.to_dict(),
        "seed": options.seed,
        "data": {
            "root": str(options.data),
            "fingerprint": config["data_fingerprint"],
            "split": config["split"],
        },
        "versions": config["versions"],
        "command": options_to_command(options),
        "validation_metrics": validation,
        **subtype,
        "training_seconds": round(time.perf_counter() - started, 1),
    }
    save_model(shipped, run.model, metadata)
    found = {"validation": validation}
    if subtype:
        found["subtype_validation"] = subtype["subtype"]["validation_metrics"]
    write_json(run.metrics, found)
    if run.history.exists():
        plot_training_curves(pd.read_csv(run.history), run.curves)
    return validation


def _fit_subtype(
    network: Any, val_x: np.ndarray, val_subtypes: np.ndarray, reporter: Reporter
) -> dict[str, Any]:
    """The ``subtype`` metadata entry: the head's weights, with its calibration and the
    threshold for the target bacterial sensitivity fitted on the validation pneumonias
    (nothing, with a warning, when the validation split lacks one of the causes)."""
    from pneumoscan.train.callbacks import predict_outputs  # lazy: loads TensorFlow

    viral, known = subtype_targets(val_subtypes)
    if len(np.unique(viral[known])) < 2:
        reporter.warn(
            "the model ships without its subtype head: the validation split has no "
            "bacterial or no viral pneumonia to set its threshold on"
        )
        return {}
    p_viral = predict_outputs(network, _rows(val_x, known))[1][:, 0].astype(np.float64)
    kernel, bias = network.get_layer(SUBTYPE_HEAD).get_weights()
    head = SubtypeHead(
        weights=np.asarray(kernel, dtype=np.float64)[:, 0],
        bias=float(np.asarray(bias).ravel()[0]),
        point=OperatingPoint(threshold=0.5),
        calibration={},
        validation_metrics={},
    )
    target = DEFAULT_BACTERIAL_SENSITIVITY
    head = fit_subtype_point(
        head,
        1 - viral[known].astype(int),
        1.0 - p_viral,
        target,
        split="val pneumonias of named cause (patient-grouped, from the training data)",
        fitted_on=VALIDATION_SPLIT,
        threshold_rule=f"highest threshold with validation bacterial sensitivity >= {target}",
    )
    return {"subtype": head.to_metadata()}
