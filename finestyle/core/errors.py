"""Error types. `UserError` means bad input or arguments: the CLI prints its one line and exits 2."""

from __future__ import annotations


class FineStyleError(Exception):
    """Base class for every error this package raises on purpose."""


class UserError(FineStyleError):
    """Unusable input or arguments. The message names the file/field/value and the fix."""


class ModelLoadError(UserError):
    """A model could not be loaded (offline hub, missing files, unsafe weights)."""


class VerificationError(FineStyleError):
    """An equivalence check failed (merge, ONNX parity, manifest hash). Never a warning."""
