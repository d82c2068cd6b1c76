"""What goes wrong in a backend (the pipeline turns these into MODEL_ERROR results)."""


class BackendError(RuntimeError):
    """A backend failed on a command (the node turns it into a MODEL_ERROR result)."""


class BackendUnavailable(BackendError):
    """The backend cannot run on this machine (a library or device is missing)."""
