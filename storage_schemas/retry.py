"""Retries with backoff for object-storage calls: one policy for the pipeline, the trainer and the audit.

Throttling, 5xx, timeouts, dropped connections (s3fs/gcsfs map most of them to OSError) and failed
verifications are retried with jittered exponential backoff; missing objects, permissions and bad
arguments are not. ``FileNotFoundError`` always propagates unchanged, so callers can test for absence.

``with_retries`` is the one entry point. A layer that surfaces its own error type binds it (and, if it
must, its own budget) with ``functools.partial`` rather than wrapping it: ``pipeline.storage.with_retries``
raises ``StorageError``, the audit's (``storage_schemas.audit._io``) ``StorageReadError``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_BOTO_LIKE = ("ClientError", "ResponseParserError", "EndpointConnectionError", "ReadTimeoutError",
              "ConnectTimeoutError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
              "IncompleteReadError", "ConnectionClosedError")
_PERMANENT_CODES = ("NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "404", "403")


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` can help."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if type(exc).__name__ in _BOTO_LIKE:
        response = getattr(exc, "response", None)
        code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
        return code not in _PERMANENT_CODES
    return isinstance(exc, OSError)


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 6, base_delay: float = 0.2,
                 max_delay: float = 8.0, sleep: Callable[[float], None] = time.sleep,
                 error: type[Exception] = OSError) -> T:
    """Call ``fn`` until it succeeds; past ``attempts`` (or on a permanent error) raise ``error``
    naming ``what`` and the last exception. FileNotFoundError is re-raised as is."""
    last: BaseException | None = None
    attempt = 0
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            last = exc
            if not is_transient(exc) or attempt == attempts:
                break
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("storage: %s failed (%s: %s); retry %d/%d in %.2fs", what, type(exc).__name__,
                        exc, attempt, attempts - 1, delay)
            sleep(delay)
    raise error(f"{what} failed after {attempt} attempt(s): {type(last).__name__}: {last}") from last
