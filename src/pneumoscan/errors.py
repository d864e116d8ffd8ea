"""Exceptions whose messages say what went wrong, where, and what to do."""

from __future__ import annotations


class PneumoscanError(Exception):
    """Base class of every error pneumoscan raises on purpose."""


class DatasetError(PneumoscanError):
    """A dataset folder is missing, empty or not laid out as expected."""


class ImageReadError(PneumoscanError):
    """A file could not be decoded as an image."""


class ModelFileError(PneumoscanError):
    """A model file is missing, damaged or lacks pneumoscan metadata."""
