"""Exceptions whose messages say what went wrong, where, and what to do."""

from __future__ import annotations


class PneumoscanError(Exception):
    """Base class of every error pneumoscan raises on purpose."""


class InvalidInputError(PneumoscanError, ValueError):
    """An argument or option is not one pneumoscan accepts (also a ``ValueError``, so code
    that caught the bare ``ValueError`` this used to be keeps working)."""


class OutputExistsError(PneumoscanError, FileExistsError):
    """An output file exists and would be overwritten (also a ``FileExistsError``)."""


class DatasetError(PneumoscanError):
    """A dataset folder is missing, empty or not laid out as expected."""


class ImageReadError(PneumoscanError):
    """A file could not be decoded as an image.

    Attributes:
        source_header: A DICOM file's header (``pneumoscan.data.dicom.DicomHeader``) when it
            was read before the pixels failed, so the failure keeps the file's identifiers.
    """

    source_header: object | None = None


class ImageTooLargeError(ImageReadError):
    """An image's header declares more pixels than pneumoscan decodes (refused unread)."""


class ImageTooSmallError(ImageReadError):
    """An image is smaller than the model can read reliably (refused unscored)."""


class UnsupportedFormatError(ImageReadError):
    """A file is an image or document of a format an X-ray does not come in (refused before
    any decoder runs)."""


class DecodeTimeoutError(ImageReadError):
    """Decoding one file passed its deadline (a scan bomb, or a far too slow decoder)."""


class FileTooLargeError(ImageReadError):
    """A file is larger than the cap on bytes read per file (refused unread)."""


class UnexpectedDecodeError(ImageReadError):
    """A decoder failed in a way no specific check foresaw; the message names the exception.

    Raised by the per-file firewall (:func:`pneumoscan.data.preprocess.decode_image`), so one bad
    file becomes one error result instead of ending a run. Seeing one is worth a bug report:
    it means a damaged file got past the checks that give specific messages.
    """


class ModelFileError(PneumoscanError):
    """A model file is missing, damaged or lacks pneumoscan metadata."""
