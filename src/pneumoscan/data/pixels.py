"""The one pixel convention of the public functions: uint8 in [0, 255].

Files decode to uint8 (:func:`pneumoscan.data.preprocess.decode_to_uint8`) and the model input is
that divided by 255 (:func:`pneumoscan.data.preprocess.to_model_input`). Arrays in another dtype are
converted here when the conversion is exact or unambiguous (float in [0, 1], which is what
:func:`pneumoscan.data.preprocess.preprocess_image` returns, or whole numbers in [0, 255]);
anything else raises with the fix in the message, because guessing a range silently would
change the probability.
"""

from __future__ import annotations

import numpy as np

#: The largest value an 8-bit pixel holds.
UINT8_MAX = 255


def as_uint8(pixels: np.ndarray, what: str = "image") -> np.ndarray:
    """``pixels`` as uint8 in [0, 255], converted when that is safe (any shape is kept).

    * uint8: returned as it is.
    * float in [0, 1] (e.g. :func:`pneumoscan.data.preprocess.preprocess_image`): times 255,
      rounded, so ``as_uint8(preprocess_image(f))`` gives back the decoded uint8 exactly.
    * float or integer holding whole numbers in [0, 255]: cast.

    Args:
        pixels: The array.
        what: How to name the array in error messages.

    Raises:
        TypeError: Boolean or non-numeric arrays (a mask, not an image).
        ValueError: NaN or infinity, or values outside both ranges above.
    """
    array = np.asarray(pixels)
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise TypeError(
            f"{what}: dtype {array.dtype} is not an image; give uint8 pixels in [0, 255] "
            "(or float in [0, 1])"
        )
    if np.issubdtype(array.dtype, np.complexfloating):
        raise TypeError(f"{what}: complex pixels; give uint8 pixels in [0, 255]")
    if array.size == 0:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"{what}: contains NaN or infinity; replace them before predicting")
    low, high = float(array.min()), float(array.max())
    if np.issubdtype(array.dtype, np.floating) and low >= 0.0 and high <= 1.0:
        # The float convention of preprocess_image/to_model_input: undo the division by 255.
        return np.round(array.astype(np.float64) * UINT8_MAX).astype(np.uint8)
    whole = np.issubdtype(array.dtype, np.integer) or bool(np.all(array == np.round(array)))
    if whole and low >= 0.0 and high <= UINT8_MAX:
        return array.astype(np.uint8)
    raise ValueError(
        f"{what}: {array.dtype} values in [{low:.4g}, {high:.4g}] are neither 8-bit pixels "
        "[0, 255] nor float in [0, 1]; rescale first, e.g. "
        "((a - a.min()) / (a.max() - a.min()) * 255).astype('uint8'), or give the original "
        "file (16-bit PNG and DICOM are read by their bit depth)"
    )
