"""The errors batchgen raises on purpose, and the exit code a scheduler sees for each.

Exit codes of `batchgen run` / `batchgen validate`:
    0  the job finished and its failures fit `execution.max_error_rate`
    1  the job failed: shards failed every attempt beyond the error budget, or workers could not start
    2  the job could not start: a bad spec, unusable input, or an output location that holds another job
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_BAD_JOB = 2


class BatchgenError(Exception):
    """Base of the errors batchgen raises on purpose; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_JOB_FAILED


class SpecError(BatchgenError, ValueError):
    """The job spec is invalid: the message names the key, the value received and the spec file."""

    exit_code = EXIT_BAD_JOB


class InputError(BatchgenError, ValueError):
    """The input cannot be read as the spec says: no files, a missing column, an unreadable footer."""

    exit_code = EXIT_BAD_JOB


class OutputConflictError(BatchgenError):
    """The output location holds another job's results (and `overwrite` was not asked for)."""

    exit_code = EXIT_BAD_JOB


class RowContractError(BatchgenError):
    """A shard's output does not hold every input row exactly once per sample and configuration."""


class WorkerStartError(BatchgenError):
    """Workers failed to start (load the model) attempt after attempt; the job cannot make progress."""


class ClusterLostError(BatchgenError):
    """The Ray cluster's head stopped answering mid-job; committed shards are kept and a rerun resumes."""
