"""The user-facing error type and the one place that formats errors."""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn


class MmcliError(Exception):
    """A user mistake (bad spec field, missing file, unreadable input, mismatch).

    The message is shown as one line, without a traceback, and the process exits with code 2.
    """

    exit_code = 2


def fail(message: str) -> NoReturn:
    """Raise an :class:`MmcliError` with ``message``."""
    raise MmcliError(message)


USER_ERRNOS = frozenset(
    {
        errno.EACCES,  # PermissionError
        errno.EPERM,  # PermissionError ("operation not permitted")
        errno.ENOENT,  # FileNotFoundError: a path (or its folder) that does not exist
        errno.ENOTDIR,  # NotADirectoryError: a file where a folder was expected
        errno.EISDIR,  # IsADirectoryError: a folder where a file was expected
        errno.EEXIST,  # FileExistsError: a file in the way of a folder to create
        errno.EROFS,  # a read-only file system
        errno.ENOSPC,  # no space left on the device
        errno.EDQUOT,  # disk quota exceeded
        errno.ENAMETOOLONG,
        errno.ELOOP,  # too many symbolic links
    }
)
"""The ``errno`` of the OS errors that come from the paths a user gave (a read-only or missing
output folder, a folder given for a file…): shown as one line naming the path, not a traceback."""

# io.atomic_write writes ``.NAME.<random>.tmp`` beside NAME; an error on it is an error on NAME.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


def user_os_error(exc: OSError) -> str | None:
    """One line for an OS error about a path the user gave, or None for any other OS error."""
    path = exc.filename2 if exc.filename2 is not None else exc.filename
    if path is None or exc.errno not in USER_ERRNOS:
        return None
    path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    folder, name = os.path.split(path)
    temporary = _TEMPORARY.match(name)
    if temporary:
        path = os.path.join(folder, temporary["name"])
    if exc.errno == errno.EEXIST and os.path.isfile(path):
        reason = "is a file, not a folder"  # os.makedirs met a file where the path needs a folder
    else:
        reason = _REASONS.get(exc.errno) or (exc.strerror or os.strerror(exc.errno)).lower()
    return f"{path}: {reason}"


_REASONS = {
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
}


def describe_validation_error(exc: Any) -> str:
    """Every mistake of a pydantic ``ValidationError`` as ``loc: message``, joined by ``; ``."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "value_error":
            # A validator's own sentence, without pydantic's prefix; one that starts by naming a
            # field of its section ("path: ...") has that field joined to the location.
            message = message.removeprefix("Value error, ")
            field = _LEADING_FIELD.match(message)
            if field:
                loc, message = f"{loc}.{field['field']}" if loc else field["field"], field["rest"]
        problems.append(f"{loc or '(top level)'}: {message}")
    return "; ".join(dict.fromkeys(problems))


_LEADING_FIELD = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_]*(?:[.\[][A-Za-z0-9_\]]+)*): (?P<rest>.+)$", re.DOTALL)


def _validation_error(exc: Exception) -> bool:
    # pydantic is imported lazily by the commands; an exception of it implies it is loaded.
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(exc, pydantic.ValidationError)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn known exceptions into one clear line on stderr and exit code 2.

    Known: :class:`MmcliError`; an ``OSError`` about a path the user gave (see
    :data:`USER_ERRNOS`: permission denied, read-only file system, a missing folder, a folder
    where a file belongs, …); a pydantic ``ValidationError`` (every field named). Ctrl-C exits
    130. ``MMCLI_DEBUG=1`` re-raises them instead so the traceback is visible.
    """
    debug = os.environ.get("MMCLI_DEBUG") == "1"
    try:
        yield
    except MmcliError as exc:
        if debug:
            raise
        _print_error(str(exc))
        raise SystemExit(exc.exit_code) from None
    except OSError as exc:
        message = user_os_error(exc)
        if debug or message is None:
            raise
        _print_error(message)
        raise SystemExit(MmcliError.exit_code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        _print_error("interrupted")
        raise SystemExit(130) from None
    except Exception as exc:
        if debug or not _validation_error(exc):
            raise
        _print_error(describe_validation_error(exc))
        raise SystemExit(MmcliError.exit_code) from None


def _print_error(message: str) -> None:
    first_line = " ".join(message.split("\n")).strip()
    print(f"mmcli: error: {first_line}", file=sys.stderr)
