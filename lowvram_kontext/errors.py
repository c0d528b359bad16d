"""Errors the user can act on.

Anything raised as a ``KontextError`` reaches the user as one line on stderr and a non-zero
exit code; its message must say what was wrong and, where it helps, what was expected and where.
"""


class KontextError(Exception):
    """A problem with the user's input, files or machine, reported as one line."""


class WeightFileError(KontextError):
    """A weight file is missing, truncated, corrupt, or holds tensors of unexpected shape."""


class ImageError(KontextError):
    """An input image is missing or cannot be decoded."""


class Cancelled(KontextError):
    """An edit was stopped at a sampling step because its cancellation was asked for; nothing was written."""


class MissingComponent(KontextError):
    """A model component (or the tokenizers) was not given and is not in the model folder or checkpoint."""

    def __init__(self, message: str, component: str):
        super().__init__(message)
        self.component = component  # "transformer", "t5", "clip", "vae" or "tokenizers"
