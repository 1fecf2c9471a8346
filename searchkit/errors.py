"""Typed errors raised by the searchkit library.

The library never prints or exits; the command-line front end turns these into one line on
stderr and an exit code. Every message names what went wrong and, where there is one, the fix.
"""

from __future__ import annotations


class SearchkitError(Exception):
    """Base class of every error searchkit raises on purpose."""


class UsageError(SearchkitError, ValueError):
    """An argument that cannot be acted on (bad label list, bad template, bad k...)."""


class UnknownModelError(SearchkitError, KeyError):
    """A model spec string that no registered encoder family understands."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelUnavailableError(SearchkitError):
    """A known model whose weights cannot be had (no network and nothing cached)."""


class MissingDependencyError(SearchkitError, ImportError):
    """An optional dependency is not installed; the message names the pip command."""


class IndexNotFoundError(SearchkitError, FileNotFoundError):
    """No index bundle at the given name or path."""


class EmptyIndexError(SearchkitError):
    """The index exists but holds nothing of the kind asked for."""


class ModelMismatchError(SearchkitError):
    """An index bundle is asked to mix embeddings of two different encoders."""


class IndexBusyError(SearchkitError):
    """Another process is writing to the same index bundle."""


class CorruptIndexError(SearchkitError):
    """The bundle's files cannot be read back (foreign or damaged files)."""


class BudgetError(UsageError):
    """No vector index fits the memory budget; `min_bytes` is the smallest budget that would."""

    def __init__(self, message: str, min_bytes: int | None = None):
        super().__init__(message)
        self.min_bytes = min_bytes


class StorageError(SearchkitError):
    """The bundle cannot be written: no space left, over a file-size limit (`ulimit -f`), a
    read-only filesystem or an I/O error. What was committed before it stays; a re-run with
    space completes."""


class InputError(SearchkitError):
    """A query input (image, path) that cannot be read or decoded."""


class DecodeError(InputError):
    """A file that exists but cannot be decoded as what its extension says."""


def require(module: str, pip_name: str | None = None):
    """Import an optional dependency or raise MissingDependencyError with an install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # also raised when sys.modules[module] is None
        raise MissingDependencyError(
            f"the optional dependency '{module}' is not installed; install it with: "
            f"pip install {pip_name or module}"
        ) from e
