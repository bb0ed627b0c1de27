"""Errors that describe bad input. The CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message names the thing that is wrong and how to fix it."""

    exit_code = 2


class RunPruned(Exception):
    """Raised from an evaluation callback to stop a run early (a pruned tuning trial)."""


class RunFailed(UserError):
    """A run that started but could not finish (diverged loss, missing artifact)."""

    exit_code = 1


def first_line(error: BaseException) -> str:
    """The first line of an error's message (library errors can span many), else its type."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
