"""Errors raised by flows. Every message names the sample (file, URL or table row) and the stage."""

from __future__ import annotations


class FlowsError(Exception):
    """Base class of every error flows raises on purpose."""


class StageError(FlowsError):
    """A stage failed on one sample; names the stage and the sample (file, URL or row)."""

    def __init__(self, stage: str, sample: str, cause: BaseException | str):
        self.stage = stage
        self.sample = sample
        self.cause = cause
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"stage {stage!r} failed on {sample}: {reason}")

    def __reduce__(self):  # keep it picklable across worker processes
        return (type(self), (self.stage, self.sample, str(self.cause)))


class EmptySourceError(FlowsError):
    """A source produced no samples (an empty folder, a glob matching nothing, a filtered-out table)."""


class ColumnError(FlowsError):
    """A table lacks the columns asked for; the message lists the ones that exist."""


class RemoteError(FlowsError):
    """A remote object could not be read: missing, forbidden, or still failing after retries."""
