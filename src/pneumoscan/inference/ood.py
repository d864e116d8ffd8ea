"""Refuse what the model was not built for: is this a frontal chest X-ray at all?

Two layers, both working on decoded pixels (so one batch function serves every backend):

1. Cheap checks, before the model: nearly constant images, colour images (colour that a single
   tint of a grey film cannot explain), extreme aspect ratios, and inverted grey levels (lungs
   brighter than the spine). Their thresholds sit far outside the range of real X-rays (see
   the constants) and need no fitting.
2. A fitted detector, stored in the model file by ``pneumoscan fit-ood``: two probabilistic-PCA
   Mahalanobis distances (Tipping & Bishop's PPCA; the distance of Lee et al., 2018, made
   stable by the low-rank model), each fitted on the model's training images:

   * appearance: a 16x16 layout of grey levels plus a 4x4 grid of edge strength, each image
     normalised for exposure. A frontal chest X-ray has a strong, stereotyped layout, so this
     catches photos, text, noise and inverted images whatever the network.
   * features: the network's last convolutional feature map, globally averaged (the layer
     Grad-CAM explains). It catches what this particular network finds unfamiliar.

   Each distance is divided by its threshold, chosen on out-of-fold scores of the training
   images (patient-grouped folds) so that about ``retention`` of them pass; the larger ratio is
   the ``ood_score`` and an image with ``ood_score > 1`` is rejected.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from pneumoscan.constants import OOD_MEMBER
from pneumoscan.data.preprocess import MAX_TINT_SPREAD, colour_spread

__all__ = ["OOD_MEMBER", "OodDetector", "cheap_reasons", "fit_detector"]

METHOD = "ppca-mahalanobis-v1"
#: Zip member of the model file holding the detector's arrays.
DEFAULT_RETENTION = 0.995
DEFAULT_COMPONENTS = 32
DEFAULT_FOLDS = 5

LAYOUT_GRID = 16
TEXTURE_GRID = 4
_CHUNK = 64

#: Standard deviation of grey levels below which an image is blank. The 5,216 training X-rays
#: have at least 19.9 and the site sample at least 35.8.
MIN_GREY_SPREAD = 8.0
#: Colour left after explaining each channel as a linear function of brightness (one tint),
#: in grey levels. Real X-rays have 0, and decoding makes tinted photos of films grey
#: (:data:`pneumoscan.data.preprocess.MAX_TINT_SPREAD`); colour photos have 15 to 140.
MAX_COLOUR_SPREAD = MAX_TINT_SPREAD
#: Width / height of the original image. Chest radiographs are 0.8-2.0 (the training
#: originals 0.99-1.94); a phone screenshot is 0.46.
ASPECT_RANGE = (0.5, 2.5)
#: Brightness of the central (spine) strip minus the lung fields, in standard deviations. The
#: training X-rays have at least -0.03 (99.9% above 0.03); inverted ones at most -0.3.
MIN_POLARITY = -0.15

INVERTED_REASON = (
    "grey levels look inverted (lungs brighter than the spine): a MONOCHROME1 image saved "
    "without its inversion? Invert it, or send the original DICOM file"
)

POLARITY_REASON = (
    "does not look like a frontal chest X-ray: the middle is darker than the lung fields "
    "(an inverted, MONOCHROME1-style image?)"
)


def grey_levels(pixels: np.ndarray) -> np.ndarray:
    """``(n, H, W)`` float32 grey levels of a uint8 RGB batch (channel mean)."""
    values = np.asarray(pixels)
    # The same float32 values as ``.mean(axis=-1)`` (sums of three uint8 are exact), at a
    # fraction of the cost of numpy's reduction over a length-3 axis.
    return (values[..., 0].astype(np.float32) + values[..., 1] + values[..., 2]) / np.float32(3)


def grey_spread(grey: np.ndarray) -> np.ndarray:
    """Standard deviation of each image's grey levels (0-255 scale)."""
    return grey.reshape(len(grey), -1).std(axis=1)


def polarity(grey: np.ndarray) -> np.ndarray:
    """Spine strip minus lung fields, rows 25-75%, in units of the image's grey-level spread.

    Positive for a frontal chest X-ray (dense mediastinum between dark lungs); an inverted
    image has exactly the opposite sign.
    """
    _, height, width = grey.shape
    rows = slice(int(0.25 * height), int(0.75 * height))
    centre = grey[:, rows, int(0.42 * width) : int(0.58 * width)].mean(axis=(1, 2))
    left = grey[:, rows, int(0.15 * width) : int(0.35 * width)]
    right = grey[:, rows, int(0.65 * width) : int(0.85 * width)]
    lungs = np.concatenate([left, right], axis=2).mean(axis=(1, 2))
    return (centre - lungs) / (grey_spread(grey) + 1.0)


def cheap_reasons(
    pixels: np.ndarray,
    sizes: Sequence[tuple[int, int]] | np.ndarray | None = None,
    polarity_check: bool = True,
) -> list[str | None]:
    """Why each image is surely not a chest X-ray, or ``None``; no model needed.

    Args:
        pixels: ``(n, H, W, 3)`` uint8 decoded images (before intensity normalisation).
        sizes: ``(width, height)`` of each original image, for the aspect-ratio check.
        polarity_check: Reject images darker in the middle than at the sides. A fitted
            detector does better (it tells an inverted X-ray from any other image by scoring
            the inverse too), so prediction turns this off when the model has one.
    """
    # Every 4th pixel of a 224 image is plenty for these global statistics, and 16 times
    # cheaper than the whole image (these checks run on every image before the model).
    step = max(1, min(pixels.shape[1:3]) // 64)
    pixels = np.asarray(pixels)[:, ::step, ::step]
    grey = grey_levels(pixels)
    spread, colour, sign = grey_spread(grey), colour_spread(pixels), polarity(grey)
    reasons: list[str | None] = []
    for index in range(len(pixels)):
        reason = None
        if spread[index] < MIN_GREY_SPREAD:
            reason = f"blank or nearly constant image (grey-level spread {spread[index]:.1f})"
        elif colour[index] > MAX_COLOUR_SPREAD:
            reason = f"colour image (colour spread {colour[index]:.0f}), not a radiograph"
        elif sizes is not None and not _aspect_ok(sizes[index]):
            width, height = sizes[index]
            low, high = ASPECT_RANGE
            reason = (
                f"aspect ratio {width / max(height, 1):.2f} (width/height) is outside "
                f"{low}-{high}: not a whole chest radiograph"
            )
        elif polarity_check and sign[index] < MIN_POLARITY:
            reason = POLARITY_REASON
        reasons.append(reason)
    return reasons


def _aspect_ok(size: Sequence[int] | np.ndarray) -> bool:
    width, height = int(size[0]), int(size[1])
    low, high = ASPECT_RANGE
    return height > 0 and low <= width / height <= high


def _block_means(grey: np.ndarray, grid: int) -> np.ndarray:
    """``(n, grid, grid)`` means of a ``grid x grid`` partition of each image (any size)."""
    _, height, width = grey.shape
    rows = np.linspace(0, height, grid + 1).astype(int)[:-1]
    cols = np.linspace(0, width, grid + 1).astype(int)[:-1]
    sums = np.add.reduceat(np.add.reduceat(grey, rows, axis=1), cols, axis=2)
    counts = np.outer(np.diff([*rows, height]), np.diff([*cols, width]))
    return sums / counts


def appearance_features(pixels: np.ndarray) -> np.ndarray:
    """Exposure-normalised layout and edge strength: ``(n, 16*16 + 4*4)`` float64.

    Args:
        pixels: ``(n, H, W, 3)`` uint8 decoded images.
    """
    if len(pixels) > _CHUNK:
        # In chunks: full-size float temporaries of thousands of images would not fit.
        chunks = [pixels[i : i + _CHUNK] for i in range(0, len(pixels), _CHUNK)]
        return np.concatenate([appearance_features(chunk) for chunk in chunks])
    grey = grey_levels(pixels)
    n = len(grey)
    spread = grey_spread(grey)[:, None] + 1.0
    layout = _block_means(grey, LAYOUT_GRID).reshape(n, -1)
    layout = (layout - layout.mean(axis=1, keepdims=True)) / spread
    # |dx| + |dy| written in place into the border-padded array: the same float32 sums as two
    # np.diff calls, without their full-size temporaries (this was 0.2 ms of predict's
    # per-image time).
    edges = np.zeros_like(grey)
    core = edges[:, :-1, :-1]
    np.subtract(grey[:, :-1, 1:], grey[:, :-1, :-1], out=core)
    np.abs(core, out=core)
    dy = np.subtract(grey[:, 1:, :-1], grey[:, :-1, :-1])
    core += np.abs(dy, out=dy)
    texture = _block_means(edges, TEXTURE_GRID).reshape(n, -1) / spread
    return np.concatenate([layout, np.log(texture + 1e-3)], axis=1).astype(np.float64)


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def one_blas_thread() -> Any:
    """A context in which NumPy's BLAS uses one thread. The detector's products are small (a
    batch of 32 by 1,280 features times 1,280 by 32 components): one OpenBLAS thread does one
    in 0.06 ms, two took up to 78 ms while decoding threads and ONNX Runtime held the cores,
    1.4 ms per image of predict's 8.5 (docs/scaling.md)."""
    return _blas().limit(limits=1, user_api="blas")


@dataclass
class PPCA:
    """A probabilistic PCA model of standardised features; :meth:`score` is its Mahalanobis
    distance divided by the number of features (about 1 for typical training images)."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    noise_variance: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance per row, divided by the dimension."""
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        with one_blas_thread():
            projected = z @ self.components.T
        inside = (projected**2 / self.variances).sum(axis=1)
        outside = np.maximum((z**2).sum(axis=1) - (projected**2).sum(axis=1), 0.0)
        return (inside + outside / self.noise_variance) / z.shape[1]

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays for an ``.npz`` file, names prefixed."""
        return {
            f"{prefix}_mean": self.mean,
            f"{prefix}_scale": self.scale,
            f"{prefix}_components": self.components,
            f"{prefix}_variances": self.variances,
            f"{prefix}_noise_variance": np.asarray(self.noise_variance),
        }

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str) -> PPCA:
        """Inverse of :meth:`to_arrays`."""
        return cls(
            mean=np.asarray(arrays[f"{prefix}_mean"], np.float64),
            scale=np.asarray(arrays[f"{prefix}_scale"], np.float64),
            components=np.asarray(arrays[f"{prefix}_components"], np.float64),
            variances=np.asarray(arrays[f"{prefix}_variances"], np.float64),
            noise_variance=float(arrays[f"{prefix}_noise_variance"]),
        )


def fit_ppca(features: np.ndarray, n_components: int = DEFAULT_COMPONENTS) -> PPCA:
    """Fit :class:`PPCA` with ``n_components`` principal directions.

    Each feature is standardised first; a feature that hardly varies in training (a dead
    channel) gets a floor of a tenth of the median spread, so a small change in it at a new
    site does not dominate the distance.
    """
    x = np.asarray(features, np.float64)
    n, dim = x.shape
    mean = x.mean(axis=0)
    spread = x.std(axis=0)
    scale = np.maximum(spread, 0.1 * float(np.median(spread)) + 1e-8)
    z = (x - mean) / scale
    # Eigenvectors of the covariance (dim x dim) rather than an SVD of the data: the same
    # directions, and far faster with many images.
    eigen, vectors = np.linalg.eigh(z.T @ z / max(n - 1, 1))
    order = np.argsort(eigen)[::-1]
    eigen, vectors = np.maximum(eigen[order], 0.0), vectors[:, order]
    k = int(max(1, min(n_components, dim - 1, n - 1)))
    noise = float(eigen[k:].mean()) if dim > k else 0.0
    noise = max(noise, 1e-6 * float(eigen[0]), 1e-12)
    variances = np.maximum(eigen[:k], noise)
    return PPCA(mean, scale, vectors[:, :k].T.copy(), variances, noise)


@dataclass
class OodDetector:
    """Fitted thresholds on appearance and (optionally) network-feature distances.

    Attributes:
        appearance: PPCA of :func:`appearance_features`.
        appearance_threshold: Distance above which an image is out of distribution.
        features: PPCA of the network's pooled feature maps, or ``None``.
        features_threshold: Its threshold.
        layers: The network layers whose globally averaged outputs are the features.
    """

    appearance: PPCA
    appearance_threshold: float
    features: PPCA | None = None
    features_threshold: float | None = None
    layers: list[str] = field(default_factory=list)

    def scores(
        self, pixels: np.ndarray, features: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(appearance ratio, feature ratio or None)``: distances over their thresholds."""
        return self.ratios(appearance_features(pixels), features)

    def ratios(
        self, appearance: np.ndarray, features: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`scores` from already computed :func:`appearance_features`."""
        ratio = self.appearance.score(appearance) / self.appearance_threshold
        if self.features is None or features is None or self.features_threshold is None:
            return ratio, None
        return ratio, self.features.score(features) / self.features_threshold

    def assess(
        self, pixels: np.ndarray, features: np.ndarray | None = None
    ) -> list[tuple[float, str | None]]:
        """``(ood_score, reason or None)`` per image; ``ood_score > 1`` means rejected.

        An image rejected on appearance whose inverse would pass is reported as inverted.
        """
        appearance, network = self.scores(pixels, features)
        combined = appearance if network is None else np.maximum(appearance, network)
        rejected = combined > 1.0
        inverse_ok = np.zeros(len(pixels), bool)
        if rejected.any():
            inverted = 255 - np.asarray(pixels)[rejected]
            inverse_ok[rejected] = self.appearance.score(appearance_features(inverted)) <= (
                self.appearance_threshold
            )
        results: list[tuple[float, str | None]] = []
        for i in range(len(pixels)):
            reason = None
            if rejected[i] and inverse_ok[i]:
                reason = INVERTED_REASON
            elif rejected[i] and appearance[i] > 1.0:
                reason = (
                    f"does not look like a frontal chest X-ray (appearance score "
                    f"{appearance[i]:.2f} > 1)"
                )
            elif rejected[i] and network is not None:
                reason = (
                    f"unlike the X-rays the model was trained on (feature score "
                    f"{network[i]:.2f} > 1)"
                )
            results.append((float(combined[i]), reason))
        return results

    def to_npz(self) -> bytes:
        """The detector's arrays as ``.npz`` bytes (for the model file)."""
        arrays = self.appearance.to_arrays("appearance")
        arrays["appearance_threshold"] = np.asarray(self.appearance_threshold)
        if self.features is not None and self.features_threshold is not None:
            arrays |= self.features.to_arrays("features")
            arrays["features_threshold"] = np.asarray(self.features_threshold)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, allow_pickle=False, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, data: bytes, layers: Sequence[str] = ()) -> OodDetector:
        """Inverse of :meth:`to_npz`; ``layers`` come from the model's metadata."""
        with np.load(io.BytesIO(data)) as arrays:
            has_features = "features_threshold" in arrays
            return cls(
                appearance=PPCA.from_arrays(arrays, "appearance"),
                appearance_threshold=float(arrays["appearance_threshold"]),
                features=PPCA.from_arrays(arrays, "features") if has_features else None,
                features_threshold=float(arrays["features_threshold"]) if has_features else None,
                layers=list(layers) if has_features else [],
            )


def _folds(groups: np.ndarray, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import GroupKFold  # lazy: loads scikit-learn

    n_groups = len(np.unique(groups))
    splits = min(n_folds, n_groups)
    if splits < 2:
        raise ValueError("fitting the OOD detector needs images of at least two patients")
    return list(GroupKFold(n_splits=splits).split(np.zeros(len(groups)), groups=groups))


def out_of_fold_scores(
    features: np.ndarray, groups: np.ndarray, n_components: int, n_folds: int
) -> np.ndarray:
    """Each image's distance under a PPCA fitted without its patient's images."""
    scores = np.empty(len(features))
    for train, held_out in _folds(groups, n_folds):
        scores[held_out] = fit_ppca(features[train], n_components).score(features[held_out])
    return scores


@dataclass
class FitReport:
    """How the detector was fitted and how it does on its own training images.

    Attributes:
        n_images: Images fitted on.
        n_patients: Distinct patients among them.
        retention: Target share of training images accepted.
        out_of_fold_rejection: Share rejected when scored by models fitted without them (the
            honest estimate of the false-rejection rate on new images like the training ones).
    """

    n_images: int
    n_patients: int
    retention: float
    out_of_fold_rejection: float


def fit_detector(
    appearance: np.ndarray,
    features: np.ndarray | None,
    groups: Sequence[str] | np.ndarray,
    layers: Sequence[str] = (),
    retention: float = DEFAULT_RETENTION,
    n_components: int = DEFAULT_COMPONENTS,
    n_folds: int = DEFAULT_FOLDS,
) -> tuple[OodDetector, FitReport]:
    """Fit the detector on X-rays the model was trained on.

    Thresholds are quantiles of out-of-fold distances (folds grouped by patient, so duplicate
    images of one patient cannot vouch for each other); with two detectors each keeps
    ``1 - (1 - retention) / 2`` so that together about ``retention`` pass.

    Args:
        appearance: :func:`appearance_features` of the images.
        features: The network's pooled features of the same images, or ``None``.
        groups: Patient of each image.
        layers: Layers the features come from (stored with the detector).
        retention: Target share of training images accepted, e.g. 0.995.
        n_components: Principal directions of each PPCA.
        n_folds: Cross-fitting folds for the thresholds.
    """
    if not 0.5 < retention < 1.0:
        raise ValueError(f"retention must be in (0.5, 1), got {retention}")
    groups = np.asarray(groups)
    detectors = 1 if features is None else 2
    quantile = 1.0 - (1.0 - retention) / detectors
    oof_a = out_of_fold_scores(appearance, groups, n_components, n_folds)
    threshold_a = float(np.quantile(oof_a, quantile))
    ratio = oof_a / threshold_a
    detector = OodDetector(fit_ppca(appearance, n_components), threshold_a)
    if features is not None:
        oof_f = out_of_fold_scores(features, groups, n_components, n_folds)
        threshold_f = float(np.quantile(oof_f, quantile))
        ratio = np.maximum(ratio, oof_f / threshold_f)
        detector.features = fit_ppca(features, n_components)
        detector.features_threshold = threshold_f
        detector.layers = list(layers)
    report = FitReport(
        n_images=len(groups),
        n_patients=len(np.unique(groups)),
        retention=retention,
        out_of_fold_rejection=float((ratio > 1.0).mean()),
    )
    return detector, report


def ood_feature_layers(network: Any) -> list[str]:
    """The layers whose globally averaged outputs are the detector's network features: the
    last convolutional feature map (the Grad-CAM target, ``top_activation`` when present).

    Earlier, larger maps detect no more (measured on the shipped model) and cost Keras a
    full-size copy of each: pooling them triples the forward pass on CPU.
    """
    from pneumoscan.inference.explain import last_conv_layer  # lazy: heatmap imports TensorFlow

    return [last_conv_layer(network)]
