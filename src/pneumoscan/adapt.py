"""Batch-norm statistics adaptation to a new site (AdaBN; Li et al., 2016, arXiv:1603.04779).

A network with batch normalisation normalises every feature with means and variances estimated
on the training hospital's images. At another hospital those statistics differ (exposure,
detector, framing), which shifts every score. Re-estimating them on the new site's own
unlabelled X-rays removes much of that shift without labels and without touching the learned
weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np


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
