"""Project-wide constants: classes, defaults and file names in one place."""

from __future__ import annotations

from pathlib import Path

#: Class names in output order; index 1 (PNEUMONIA) is the positive class.
#: The package version (``pneumoscan.__version__``), recorded with every result.
VERSION = "0.1.0"

CLASSES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
POSITIVE_CLASS = "PNEUMONIA"
POSITIVE_INDEX = 1

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpeg", ".jpg", ".png"})

DEFAULT_IMAGE_SIZE: tuple[int, int] = (224, 224)
DEFAULT_SEED = 42
DEFAULT_VAL_FRACTION = 0.10
#: A val/ folder smaller than this is merged into train and a patient-grouped split carved
#: instead (the public Kaggle val/ holds 16 images: far too few to select or calibrate on).
MIN_VAL_IMAGES = 100
DEFAULT_THRESHOLD = 0.5
#: Bootstrap resamples behind every AUC, PR AUC and F1 interval.
DEFAULT_RESAMPLES = 2000
#: Sensitivity the operating threshold is chosen for: missing pneumonia costs more than a
#: false alarm in triage.
DEFAULT_TARGET_SENSITIVITY = 0.97
#: Sensitivity ``pneumoscan calibrate`` aims for by default. With the confidence margin below,
#: the refit delivered about 0.965 on held-out patients of the site sample (cross-validated;
#: MODEL_CARD.md), against 0.94 for the old margin-free 0.97 target.
DEFAULT_SITE_TARGET_SENSITIVITY = 0.95
#: Bacterial sensitivity the subtype call's threshold is set for: calling a bacterial
#: pneumonia viral (no antibiotics) is the costly error (issue 21's target).
DEFAULT_BACTERIAL_SENSITIVITY = 0.90
#: One-sided confidence of a site threshold's sensitivity bound when none is given to the
#: cross-validation helpers. ``pneumoscan calibrate`` itself chooses it per sample, by the
#: split check of ``pneumoscan.train.promise`` (MODEL_CARD.md).
DEFAULT_CONFIDENCE = 0.8
#: Training images (a seeded sample) beside the site's in the head refit of ``calibrate``.
DEFAULT_HEAD_TRAIN_IMAGES = 2000
#: Training images whose pooled features a model file carries for that refit (float16:
#: 1,500 x 1,280 features of Lite0 add 3.8 MB), so a hospital needs only its own sample.
DEFAULT_HEAD_PRIOR_IMAGES = 1500
#: Training images that calibrate an int8 export's activation ranges.
DEFAULT_CALIBRATION_IMAGES = 256
#: Threads decoding images ahead of the forward pass.
DEFAULT_WORKERS = 2
#: Longest side of a Grad-CAM overlay (CLI ``--heatmaps`` and the service).
HEATMAP_MAX_SIDE = 640

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
DEFAULT_MODEL_NAME = "efficientnet_lite0-res224-kermany"
DEFAULT_MODEL_PATH = ASSETS_DIR / "models" / f"{DEFAULT_MODEL_NAME}.keras"
#: The int8 ONNX export of the shipped model, built by scripts/rebuild_default_model.sh; the
#: default prediction path (no TensorFlow import, about 1.9x the float32 ONNX speed end to end).
DEFAULT_ONNX_PATH = DEFAULT_MODEL_PATH.with_suffix(".int8.onnx")
SAMPLES_DIR = ASSETS_DIR / "samples"

#: Member of the .keras zip that carries pneumoscan's metadata.
METADATA_MEMBER = "pneumoscan.json"
#: Model-file member holding the fitted out-of-distribution detector (``.npz``).
OOD_MEMBER = "pneumoscan_ood.npz"
#: Model-file member holding training features and labels for the site head refit (``.npz``).
HEAD_PRIOR_MEMBER = "pneumoscan_head_prior.npz"
