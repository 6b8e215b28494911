"""The two kinds of failure the CLI tells apart, by exit code.

Every error the launcher raises subclasses one of these, so the CLI maps an exception to its
exit code with one isinstance check instead of a list of classes.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInputError(Exception):
    """Bad input from the user (recipe, data, model path, flag, layout): exit code 2."""

    exit_code = EXIT_BAD_INPUT


class JobFailedError(Exception):
    """The job ran and failed (training, export, a cluster job): exit code 1."""

    exit_code = EXIT_FAILED


def exit_code_for(exc: BaseException) -> int:
    """2 for bad input, 1 for everything else that went wrong."""
    if isinstance(exc, BadInputError | FileNotFoundError):
        return EXIT_BAD_INPUT
    return EXIT_FAILED
