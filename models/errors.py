"""Errors that explain themselves.

Every failure a user can cause (a bad checkpoint, an unknown variant, a scale that
does not match the weights) raises one of these with a one-paragraph message that
names the problem and the fix. Command-line entry points print the message and exit
with status 2 instead of showing a traceback.
"""
from __future__ import annotations


class ESCError(Exception):
    """Base class of the toolkit's user-facing errors."""


class CheckpointError(ESCError, ValueError):
    """A checkpoint cannot be read, recognised or loaded strictly."""


class UnknownVariantError(ESCError, ValueError):
    """A variant name that the toolkit does not know."""


class WeightsDownloadError(ESCError, RuntimeError):
    """Official weights could not be downloaded."""


class AttentionBackendError(ESCError, RuntimeError):
    """An attention back-end cannot run here (missing device, library or feature)."""


class ModelOptionError(ESCError, ValueError):
    """A model option (form, back-end setting) that does not exist or cannot apply."""
