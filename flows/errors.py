"""Errors raised by flows. Every message names the sample (file, URL or table row) and the stage."""

from __future__ import annotations


class FlowsError(Exception):
    """Base class of every error flows raises on purpose."""


class StageError(FlowsError):
    """A stage failed on one sample; the message names the stage and the sample (file, URL or
    table row). Built with :meth:`at`; the one-argument form lets worker threads re-raise it."""

    def __init__(self, message: str, stage: str | None = None, sample: str | None = None):
        super().__init__(message)
        self.stage, self.sample = stage, sample

    @classmethod
    def at(cls, stage: str, sample: str, cause: BaseException | str) -> StageError:
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        reason = next((line for line in reason.splitlines() if line.strip()), reason)  # one line
        return cls(f"stage {stage!r} failed on {sample}: {reason}", stage, sample)

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (str(self), self.stage, self.sample))


class EmptySourceError(FlowsError):
    """A source produced no samples (an empty folder, a glob matching nothing, a filtered-out table)."""


class ColumnError(FlowsError):
    """A table lacks the columns asked for; the message lists the ones that exist."""


class RemoteError(FlowsError):
    """A remote object could not be read: missing, forbidden, or still failing after retries."""
