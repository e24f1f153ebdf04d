"""The user-facing error type and the one place that formats errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class MmcliError(Exception):
    """A user mistake (bad spec field, missing file, unreadable input, mismatch).

    The message is shown as one line, without a traceback, and the process exits with code 2.
    """

    exit_code = 2


def fail(message: str) -> NoReturn:  # noqa: F821 - typing only
    """Raise an :class:`MmcliError` with ``message``."""
    raise MmcliError(message)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn known exceptions into one clear line on stderr and exit code 2.

    ``MMCLI_DEBUG=1`` re-raises them instead so the traceback is visible.
    """
    try:
        yield
    except MmcliError as exc:
        if os.environ.get("MMCLI_DEBUG") == "1":
            raise
        _print_error(str(exc))
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        if os.environ.get("MMCLI_DEBUG") == "1":
            raise
        _print_error("interrupted")
        raise SystemExit(130) from None


def _print_error(message: str) -> None:
    first_line = " ".join(message.split("\n")).strip()
    print(f"mmcli: error: {first_line}", file=sys.stderr)
