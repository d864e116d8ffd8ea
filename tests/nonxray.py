"""Things that are not frontal chest X-rays, for measuring the out-of-distribution check.

Every image is made here or ships inside an installed wheel (scikit-image's and
scikit-learn's sample images), so nothing is downloaded. Each generator is seeded, and every
image is returned as PNG bytes: the measurement then goes through the same decoder as a user's
file. Used by ``tests/test_ood.py`` (a few of each kind) and ``benchmarks/ood_rates.py`` (all).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

_WORDS = [
    "patient",
    "report",
    "findings",
    "chest",
    "radiograph",
    "lungs",
    "clear",
    "pneumonia",
    "consolidation",
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "invoice",
    "total",
    "amount",
    "due",
    "error",
    "warning",
    "settings",
    "cancel",
    "ok",
    "login",
    "password",
    "results",
    "positive",
    "negative",
    "99%",
    "confidence",
]


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode a uint8 grey or RGB(A) array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def natural_images() -> Iterator[tuple[str, np.ndarray]]:
    """Photos and scientific images shipped by scikit-image and scikit-learn, plus variants.

    Each image gives four: as shipped, greyscale, a central crop and a greyscale mirror image
    (greyscale photos are the hard case: the colour check cannot catch them).
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = [
        "astronaut",
        "brick",
        "camera",
        "cat",
        "cell",
        "checkerboard",
        "chelsea",
        "clock",
        "coffee",
        "coins",
        "colorwheel",
        "grass",
        "gravel",
        "horse",
        "hubble_deep_field",
        "immunohistochemistry",
        "logo",
        "microaneurysms",
        "moon",
        "page",
        "retina",
        "rocket",
        "shepp_logan_phantom",
        "text",
        "binary_blobs",
    ]
    sources: list[tuple[str, np.ndarray]] = []
    for name in names:
        sources.append((name, np.asarray(getattr(skimage.data, name)())))
    samples = load_sample_images()
    for file_name, image in zip(samples.filenames, samples.images, strict=True):
        sources.append((Path(file_name).stem, np.asarray(image)))
    for name, raw in sources:
        image = _to_uint8(raw)
        grey = np.asarray(Image.fromarray(image).convert("L"))
        height, width = grey.shape
        crop = image[height // 5 : height * 4 // 5, width // 5 : width * 4 // 5]
        yield f"{name}", image
        yield f"{name}-grey", grey
        yield f"{name}-crop", crop
        yield f"{name}-grey-mirror", grey[:, ::-1].copy()


def small_photos(n: int = 200) -> Iterator[tuple[str, np.ndarray]]:
    """scikit-image's ``lfw_subset``: 25x25 greyscale faces and non-faces, scaled up 4x
    (images under 64 pixels a side are refused before any model sees them)."""
    import skimage.data

    for index, patch in enumerate(skimage.data.lfw_subset()[:n]):
        small = Image.fromarray(_to_uint8(patch))
        yield f"lfw-{index:03d}", np.asarray(small.resize((100, 100), Image.Resampling.BILINEAR))


def _to_uint8(raw: np.ndarray) -> np.ndarray:
    if raw.dtype == bool:
        return raw.astype(np.uint8) * 255
    if raw.dtype != np.uint8:
        low, high = float(raw.min()), float(raw.max())
        return np.round((raw - low) / max(high - low, 1e-9) * 255).astype(np.uint8)
    return raw


def _random_line(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(_WORDS, size=int(rng.integers(2, 8))))


def text_images(n: int = 100, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """Rendered text: documents, dark-mode screens, screenshots with a title bar, captions.

    Screenshots of text scored "pneumonia, 99%" are a known failure of public chest X-ray
    models, so these come in several sizes and layouts.
    """
    rng = np.random.default_rng(seed)
    styles = ("document", "dark", "screenshot", "caption")
    for index in range(n):
        style = styles[index % len(styles)]
        width, height = int(rng.integers(300, 1400)), int(rng.integers(300, 1000))
        size = int(rng.integers(10, 48))
        background, ink = ((255, 255, 255), (0, 0, 0))
        if style == "dark":
            background, ink = (30, 30, 30), (220, 220, 220)
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        top = 0
        if style == "screenshot":
            bar = tuple(int(v) for v in rng.integers(0, 255, 3))
            draw.rectangle((0, 0, width, 40), fill=bar)
            top = 50
        if style == "caption":
            level = int(rng.integers(60, 200))
            image.paste((level, level, level), (0, 0, width, height))
            ink = (255, 255, 255) if level < 128 else (0, 0, 0)
        font = ImageFont.load_default(size=size)
        y = top + 5
        while y < height - size:
            draw.text((10, y), _random_line(rng), fill=ink, font=font)
            y += int(size * 1.5)
        yield f"text-{style}-{index:03d}", np.asarray(image)


def noise_images(n: int = 60, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """Uniform, Gaussian, salt-and-pepper, colour and smooth (blurred) noise."""
    rng = np.random.default_rng(seed)
    kinds = ("uniform", "gaussian", "salt-pepper", "colour", "smooth", "smooth-colour")
    for index in range(n):
        kind = kinds[index % len(kinds)]
        shape = (int(rng.integers(200, 800)), int(rng.integers(200, 800)))
        if kind == "uniform":
            pixels = rng.integers(0, 256, shape).astype(np.uint8)
        elif kind == "gaussian":
            pixels = np.clip(rng.normal(128, 50, shape), 0, 255).astype(np.uint8)
        elif kind == "salt-pepper":
            pixels = (rng.random(shape) < 0.5).astype(np.uint8) * 255
        elif kind == "colour":
            pixels = rng.integers(0, 256, (*shape, 3)).astype(np.uint8)
        else:
            channels = 3 if kind == "smooth-colour" else 1
            raw = rng.integers(0, 256, (*shape, channels)).astype(np.uint8).squeeze()
            radius = float(rng.uniform(4, 30))
            blurred = Image.fromarray(raw).filter(ImageFilter.GaussianBlur(radius))
            pixels = np.asarray(blurred)
            low, high = pixels.min(), pixels.max()
            pixels = ((pixels - low) / max(int(high - low), 1) * 255).astype(np.uint8)
        yield f"noise-{kind}-{index:03d}", pixels


def blank_images(n: int = 20, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """Constant grey or colour images, some with faint sensor-like noise, and smooth ramps."""
    rng = np.random.default_rng(seed)
    for index in range(n):
        shape = (int(rng.integers(100, 600)), int(rng.integers(100, 600)))
        kind = ("grey", "colour", "faint-noise", "ramp")[index % 4]
        if kind == "grey":
            pixels = np.full(shape, int(rng.integers(0, 256)), np.uint8)
        elif kind == "colour":
            pixels = np.broadcast_to(rng.integers(0, 256, 3).astype(np.uint8), (*shape, 3)).copy()
        elif kind == "faint-noise":
            level = float(rng.integers(10, 245))
            pixels = np.clip(rng.normal(level, 1.5, shape), 0, 255).astype(np.uint8)
        else:
            ramp = np.linspace(float(rng.integers(0, 128)), float(rng.integers(128, 256)), shape[1])
            pixels = np.broadcast_to(ramp, shape).astype(np.uint8)
        yield f"blank-{kind}-{index:03d}", pixels


def inverted_xrays(paths: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Real X-rays with grey levels inverted: a MONOCHROME1 image shown without its LUT."""
    for path in paths:
        grey = np.asarray(Image.open(path).convert("L"))
        yield f"inverted-{path.stem}", 255 - grey


def kind_of(name: str) -> str:
    """The kind a generated image belongs to, from its name."""
    for prefix in ("text", "noise", "blank", "inverted", "lfw"):
        if name.startswith(prefix):
            return "small photo" if prefix == "lfw" else prefix
    return "natural"
