"""The one exception type for mistakes a user can fix: a bad config, bad data, an unusable checkpoint.

Entry points (`train.py`, `inference.py`) catch `UserError`, print its message once (rank 0 only)
and exit with `USER_ERROR_EXIT_CODE`; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2  # argparse's code for bad usage, so wrappers can tell it from a crash


class UserError(Exception):
    """Something the user can fix; the message alone must say what and where (key, file, step)."""
