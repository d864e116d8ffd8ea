"""Adapting a trained network to a new site: batch-norm statistics (AdaBN; Li et al., 2016,
arXiv:1603.04779) from unlabelled images, and the final layer refitted on training plus
labelled site features.

A network with batch normalisation normalises every feature with means and variances estimated
on the training hospital's images. At another hospital those statistics differ (exposure,
detector, framing), which shifts every score. Re-estimating them on the new site's own
unlabelled X-rays removes much of that shift without labels and without touching the learned
weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras
import numpy as np
from scipy.special import expit


def batch_norm_layers(network: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every batch-normalisation layer inside ``network`` (nested models included)."""
    return [
        layer
        for layer in network._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def adapt_batch_norm(network: keras.Model, batches: Iterable[np.ndarray]) -> int:
    """Replace the batch-norm moving statistics by those of ``batches`` (model inputs).

    Each batch is passed once in training mode with dropout switched off; the momentum of the
    k-th batch is k/(k+1), so the result is the running average of the batch statistics over
    all images, whatever their number.

    Args:
        network: A Keras model; changed in place (only moving means and variances).
        batches: Float32 model inputs ``(n, H, W, 3)``.

    Returns:
        The number of images used.

    Raises:
        ValueError: The network has no batch normalisation, or no image was given.
    """
    norms = batch_norm_layers(network)
    if not norms:
        raise ValueError("the network has no batch normalisation to adapt")
    drops = [
        layer
        for layer in network._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.Dropout)
    ]
    momenta = [layer.momentum for layer in norms]
    trainable = [layer.trainable for layer in norms]
    rates = [layer.rate for layer in drops]
    used = 0
    try:
        for layer in norms:
            # A frozen layer (trainable=False) runs in inference mode even when called with
            # training=True, and would silently keep its old statistics.
            layer.trainable = True
        for layer in drops:
            layer.rate = 0.0  # stochastic depth would distort the statistics downstream
        for k, batch in enumerate(batches):
            for layer in norms:
                layer.momentum = k / (k + 1)
            network(batch, training=True)
            used += len(batch)
    finally:
        for layer, momentum, flag in zip(norms, momenta, trainable, strict=True):
            layer.momentum = momentum
            layer.trainable = flag
        for layer, rate in zip(drops, rates, strict=True):
            layer.rate = rate
    if used == 0:
        raise ValueError("no image to adapt the batch-norm statistics on")
    return used


#: Weights of each site image against one training image in the head refit, tried in turn.
SITE_WEIGHTS = (1.0, 5.0, 20.0, 50.0)
#: Inverse L2 strength of the refitted head (measured: 0.01 with the site weighted 20 gave the
#: held-back set +0.006 AUC over the same refit without site images).
HEAD_C = 0.01
HEAD_LAYER = "predictions"


def head_layer(network: keras.Model) -> keras.layers.Dense:
    """The final 2-class dense layer (``predictions`` in the registry's networks).

    Raises:
        ValueError: The network ends in something else.
    """
    names = {layer.name for layer in network.layers}
    last = network.get_layer(HEAD_LAYER) if HEAD_LAYER in names else network.layers[-1]
    if not isinstance(last, keras.layers.Dense) or last.units != 2:
        raise ValueError(f"{network.name} does not end in a 2-class dense layer to refit")
    return last


def pooled_features(network: keras.Model, inputs: Iterable[np.ndarray]) -> np.ndarray:
    """The input of the network's final dense layer (pooled features) for batches of inputs."""
    head = head_layer(network)
    extractor = keras.Model(network.inputs, head.input)
    parts = [np.asarray(extractor.predict_on_batch(batch)) for batch in inputs]
    return np.concatenate(parts) if parts else np.zeros((0, head.input.shape[-1]))


def _fit_logistic(
    features: np.ndarray, labels: np.ndarray, weights: np.ndarray, c: float
) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression  # lazy: loads scikit-learn

    fit = LogisticRegression(C=c, max_iter=2000).fit(features, labels, sample_weight=weights)
    return fit.coef_[0].astype(np.float64), float(fit.intercept_[0])


def refit_head(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    site_features: np.ndarray,
    site_labels: np.ndarray,
    site_patients: np.ndarray,
    original_raw: np.ndarray,
    site_weights: Iterable[float] = SITE_WEIGHTS,
    c: float = HEAD_C,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Refit the final layer on training plus site features, the site's weight chosen by
    patient-grouped cross-validation on the site sample.

    Each candidate weight is scored by the out-of-fold AUC of the site images (a refit that
    never saw a held-out patient's images scores them); the network's own head, scored by
    ``original_raw``, is a candidate too, and is kept unless a refit beats it.

    Returns:
        ``chosen`` (``"original"`` or the weight), ``candidates`` (weight -> out-of-fold AUC),
        ``oof_raw`` (the chosen candidate's out-of-fold raw P(pneumonia) of the site images:
        what new site images will look like to it, for fitting the threshold), and for a
        refit ``coef`` and ``intercept`` fitted on all images.
    """
    from sklearn.metrics import roc_auc_score  # lazy: loads scikit-learn
    from sklearn.model_selection import StratifiedGroupKFold  # lazy: loads scikit-learn

    n_folds = min(folds, int(np.bincount(site_labels, minlength=2).min()))
    if n_folds < 2:
        raise ValueError("the head refit needs at least two images of each class")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(site_features, site_labels, site_patients))
    candidates: dict[str, float] = {"original": float(roc_auc_score(site_labels, original_raw))}
    oof: dict[str, np.ndarray] = {"original": np.asarray(original_raw, np.float64)}
    for weight in site_weights:
        scores = np.empty(len(site_labels))
        for fit, held in splits:
            features = np.concatenate([train_features, site_features[fit]])
            labels = np.concatenate([train_labels, site_labels[fit]])
            weights = np.r_[np.ones(len(train_labels)), np.full(len(fit), weight)]
            coef, intercept = _fit_logistic(features, labels, weights, c)
            scores[held] = expit(site_features[held] @ coef + intercept)
        key = f"{weight:g}"
        candidates[key], oof[key] = float(roc_auc_score(site_labels, scores)), scores
    chosen = max(candidates, key=lambda k: (candidates[k], k == "original"))
    result: dict[str, Any] = {"chosen": chosen, "candidates": candidates, "c": c}
    result["oof_raw"] = oof[chosen]
    if chosen != "original":
        features = np.concatenate([train_features, site_features])
        labels = np.concatenate([train_labels, site_labels])
        weights = np.r_[np.ones(len(train_labels)), np.full(len(site_labels), float(chosen))]
        result["coef"], result["intercept"] = _fit_logistic(features, labels, weights, c)
    return result


def set_binary_head(network: keras.Model, coef: np.ndarray, intercept: float) -> None:
    """Write a logistic regression into the 2-class softmax head: softmax(z)[1] equals
    sigmoid(z1 - z0), so class 0 gets zeros and class 1 the regression."""
    head = head_layer(network)
    kernel, bias = head.get_weights()
    kernel = np.zeros_like(kernel)
    kernel[:, 1] = coef
    bias = np.array([0.0, intercept], dtype=bias.dtype)
    head.set_weights([kernel, bias])
