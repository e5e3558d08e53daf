"""Exceptions that report a problem with the user's input or run directory (exit code 2)."""


class UsageError(ValueError):
    """A request that cannot be carried out as given. The message names what to change."""


class ResumeError(UsageError):
    """A run directory that cannot be resumed with the current command."""


class SampleConflictError(RuntimeError):
    """A posterior-sample file exists with different content than the one being written."""


class ReplicaMismatchError(RuntimeError):
    """Data-parallel replicas hold different parameters, so the chain is no longer one chain."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written; the previous committed checkpoint is intact."""


# EX_TEMPFAIL from BSD sysexits.h: a temporary failure, the caller may retry. Job scripts
# requeue on it (see launch/slurm.sbatch).
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """Training stopped after a preemption signal, with a checkpoint at the stop."""
