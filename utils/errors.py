"""The one exception type for mistakes a user can fix: a bad config, bad data, an unusable checkpoint.

Entry points (`train.py`, `inference.py`) catch `UserError`, print its message once (rank 0 only)
and exit with `USER_ERROR_EXIT_CODE`; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

USER_ERROR_EXIT_CODE = 2  # argparse's code for bad usage, so wrappers can tell it from a crash


class UserError(Exception):
    """Something the user can fix; the message alone must say what and where (key, file, step)."""


class ConfigError(UserError, ValueError):
    """A configuration file or override is invalid; the message names the key and its source."""


def exit_code_of(job: Callable[[], object]) -> int:
    """Run an entry point's job: 0 when it returns, `USER_ERROR_EXIT_CODE` after printing a
    `UserError`'s message once (rank 0 only, under torchrun); any other exception propagates."""
    try:
        job()
    except UserError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    return 0
