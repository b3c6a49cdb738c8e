"""Typed errors shared by every layer.

Each error says what went wrong in words a user can act on. The API maps these classes to
HTTP statuses in one table and the UI shows their message; nobody matches on message text.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(WorkbenchError):
    """A request or a parameter is not acceptable; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceededError(InvalidRequestError):
    """The request cannot fit in the model's context window."""


class UnsafePathError(InvalidRequestError):
    """A user-given name would resolve outside the folder it belongs to."""


class ModelNotLoadedError(WorkbenchError):
    """A generation or tokenizer call came while no model is loaded."""


class NotFoundError(InvalidRequestError):
    """A named thing (model, chat, template, character) does not exist: a 404 in the API."""


class ModelNotFoundError(NotFoundError):
    """The named model is not in the models folder."""


class ChatNotFoundError(NotFoundError):
    """No saved chat has that id for that character."""


class TemplateNotFoundError(NotFoundError):
    """No instruction template of that name in instruction-templates/."""


class ModelLoadError(WorkbenchError):
    """A model could not be loaded (bad file, wrong format, out of memory...)."""


class UnknownLoaderError(ModelLoadError):
    """No loader is registered under that name."""


class BackendMissingError(ModelLoadError):
    """The backend library a loader needs is not installed; the message names the fix."""


class UnsupportedOptionError(ModelLoadError):
    """A load option cannot work on this machine (e.g. 4-bit loading without a GPU)."""


class QueueFullError(WorkbenchError):
    """Every slot is busy and the wait queue (--max-queue) is full: try again shortly."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GenerationError(WorkbenchError):
    """The backend failed in the middle of a generation."""


class DownloadError(WorkbenchError):
    """The hub could not be reached, or a file could not be fetched."""


class ChecksumError(DownloadError):
    """A downloaded file does not match the size or hash the hub lists for it."""


class DownloadCancelled(DownloadError):
    """The user stopped the download; partial files are kept for a resume."""
