"""Argument types and the usage error shared by every `trajflow` subcommand (a leaf: the dispatcher in
``trajflow.cli`` and the command modules import it, it imports none of them)."""

from __future__ import annotations

import argparse
import json
import re

__all__ = ["UsageError", "json_object_arg", "int_list", "float_list", "one_line"]


class UsageError(Exception):
    """Bad flags or values: exit status 2 with a one-line message."""


def json_object_arg(text: str) -> dict:
    """argparse type: a JSON object (e.g. --storage-options)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


#: how torch's DataLoader prefixes an error it re-raises from a worker process
_WORKER_TRACEBACK = re.compile(r"Caught \w+ in DataLoader worker process (\d+)\.\s*Original Traceback")
#: exception types whose message alone is not self-explanatory (their type name is shown too)
_BARE_TYPES = (KeyError, IndexError, TypeError, AttributeError, AssertionError, NameError, RecursionError,
               ZeroDivisionError, NotImplementedError)


def one_line(exc: BaseException, limit: int = 2000) -> str:
    """``exc`` as one line: whitespace (newlines of nested tracebacks included) collapsed, at most ``limit``
    characters; the type name is prepended where the message alone says little (KeyError('spec') -> "KeyError:
    'spec'")."""
    text = str(exc)
    worker = _WORKER_TRACEBACK.match(text)
    if worker:  # torch re-raises a DataLoader worker's error with the worker's whole traceback as its message
        original = re.search(r".*\n(?:[\w.]+\.)?" + re.escape(type(exc).__name__) + r": (.*)\Z", text, re.S)
        if original:
            text = f"{original.group(1)} (in data-loader worker {worker.group(1)})"
    msg = " ".join(text.split())
    if not msg or isinstance(exc, _BARE_TYPES):
        msg = f"{type(exc).__name__}: {msg}".rstrip(": ") + " (run `trajflow -v ...` for the traceback)"
    return msg if len(msg) <= limit else msg[:limit - 1] + "…"
