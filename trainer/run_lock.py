"""The run lock: which run owns an ``--out`` (``checkpoints/owner.json``). ``RunLockMixin`` gives
``CheckpointStore`` its ``acquire_run_lock`` and the owner record's create-only / conditional reads and writes
(local disk: hard links and renames; object storage: ``If-None-Match`` / ``If-Match``); ``RunLock`` is the held
lock (heartbeat, release). See ``trainer.checkpoint`` for what it guarantees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from trainer.checkpoint_files import (
    MAX_SMALL_JSON_BYTES,
    CheckpointCorrupt,
    RunLocked,
    fsync_dir,
    local_temp_file,
    one_line,
    parse_json_bounded,
    pid_alive,
    pid_start,
    redact_url,
    retry_io,
    temp_name,
    write_local_atomic,
    write_new_file,
)

#: the run lock: who owns this --out (created create-only; see ``CheckpointStore.acquire_run_lock``)
OWNER = "checkpoints/owner.json"
#: a run lock whose heartbeat is older than this (seconds) is stale, unless its process is alive on this host
LOCK_STALE_AFTER = 600.0
#: the checkpoint's messages keep the logger name they always had (``trainer.checkpoint``)
log = logging.getLogger("trainer.checkpoint")


def _precondition_failed(e: BaseException) -> bool:
    """Whether ``e`` is an object store's 412 (a conditional write whose condition did not hold)."""
    seen = 0
    while e is not None and seen < 5:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return True
        text = str(e).lower()
        if "precondition" in text or "pre-condition" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _iso(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


class RunLockMixin:
    """The run lock's methods of ``CheckpointStore`` (which supplies ``fs``, ``out``, ``is_local``, ``_path``,
    ``where`` and ``_read_capped``)."""

    def acquire_run_lock(self, *, stale_after: float = LOCK_STALE_AFTER, run_id: str | None = None) -> RunLock:
        """Make this process the owner of ``out`` (``checkpoints/owner.json``: run id, host, pid, start and
        heartbeat times), or raise :class:`RunLocked` naming the live run that owns it. A lock whose process has
        died on this host, or whose heartbeat is older than ``stale_after`` seconds (another host), is taken
        over with a warning. Call on the main process only; ``RunLock.refresh`` at each checkpoint (or
        ``maybe_refresh`` every step) keeps it fresh, ``release`` (or the ``with`` block's end) removes it."""
        record = {"version": 1, "run_id": run_id or uuid.uuid4().hex, "host": socket.gethostname(),
                  "pid": os.getpid(), "pid_start": pid_start(os.getpid()), "started": time.time()}
        record["heartbeat"] = record["started"]
        data = json.dumps(record, sort_keys=True).encode()
        for _ in range(6):
            created = self._owner_create(data)
            raw, doc, etag = self._owner_read()
            if doc is not None and doc.get("run_id") == record["run_id"]:  # ours (also a retried create's)
                return RunLock(self, record, raw, etag, stale_after)
            if created or raw is None:
                continue  # replaced or gone at once: look again
            why = _lock_stale(doc, stale_after)
            if why is None:
                raise RunLocked(self._locked_message(doc, stale_after))
            log.warning("taking over the run lock %s of %s: %s", self.where(OWNER), _owner_desc(doc), why)
            self._owner_swap(raw, etag, data)
        raise RunLocked(f"{redact_url(self.out)} is being claimed by other runs at the same time (the run lock "
                        f"{self.where(OWNER)} kept changing); start one run at a time on an --out")

    def _locked_message(self, doc: dict[str, Any] | None, stale_after: float) -> str:
        return (f"{redact_url(self.out)} is in use by another run ({_owner_desc(doc)}); wait for it to finish or "
                f"train into another --out (its lock {self.where(OWNER)} is taken over once that process has ended "
                f"on its host, or its heartbeat is over {stale_after:.0f} s old)")

    def _owner_read(self) -> tuple[bytes | None, dict[str, Any] | None, str | None]:
        """(raw bytes, parsed record or None when unusable, ETag on object storage) of owner.json; (None, None,
        None) when there is none."""
        path = self._path(OWNER)
        etag = None
        try:
            if self.is_local:
                with open(path, "rb") as f:
                    raw = f.read(MAX_SMALL_JSON_BYTES + 1)
            else:
                for _ in range(3):  # the ETag of exactly the bytes read
                    with contextlib.suppress(Exception):
                        self.fs.invalidate_cache(path)
                    etag = retry_io(lambda: self.fs.info(path), f"reading {self.where(OWNER)}").get("ETag")
                    raw = self._read_capped(OWNER, MAX_SMALL_JSON_BYTES)
                    with contextlib.suppress(Exception):
                        self.fs.invalidate_cache(path)
                    if retry_io(lambda: self.fs.info(path), f"reading {self.where(OWNER)}").get("ETag") == etag:
                        break
        except FileNotFoundError:
            return None, None, None
        try:
            doc = parse_json_bounded(raw, self.where(OWNER), max_bytes=MAX_SMALL_JSON_BYTES)
        except CheckpointCorrupt:
            doc = None
        return raw, doc if isinstance(doc, dict) else None, etag

    def _owner_create(self, data: bytes) -> bool:
        """Create owner.json holding ``data`` only if there is none: True if this call created it."""
        path = self._path(OWNER)
        if self.is_local:
            def create() -> bool:
                tmp = local_temp_file(path, data)
                try:
                    try:
                        os.link(tmp, path)  # appears whole, or fails if the name exists
                    except FileExistsError:
                        return False
                    except OSError:  # no hard links here (some FUSE/SMB mounts): an exclusive create
                        try:
                            write_new_file(path, data)
                        except FileExistsError:
                            return False
                    fsync_dir(os.path.dirname(path))
                    return True
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
            return retry_io(create, f"creating {self.where(OWNER)}")

        def create_remote() -> bool:
            try:
                self.fs.pipe_file(path, data, mode="create")  # S3: If-None-Match: *
            except FileExistsError:
                return False
            except TypeError:  # a filesystem without conditional writes: best effort
                log.warning("%s has no create-only writes; the run lock is checked, then written", type(self.fs).__name__)
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
            except OSError as e:
                if _precondition_failed(e):
                    return False
                raise
            return True
        created = retry_io(create_remote, f"creating {self.where(OWNER)}")
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)
        return created

    def _owner_swap(self, expect: bytes, etag: str | None, data: bytes) -> bool:
        """Replace owner.json by ``data`` only if it still holds ``expect`` (a stale lock being taken over).
        S3: a PUT with ``If-Match: <etag>``. Local: the record is renamed aside and compared; a record that
        changed meanwhile is put back (a third run could create one in that instant: the later ``refresh`` of
        one of the two then fails). True if this call replaced it."""
        path = self._path(OWNER)
        if not self.is_local:
            def swap() -> bool:
                try:
                    if etag is None:
                        raise TypeError("no ETag")
                    self.fs.pipe_file(path, data, IfMatch=etag)
                except TypeError:  # no conditional replace: delete, then create-only
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(path)
                    return self._owner_create(data)
                except OSError as e:
                    if _precondition_failed(e):
                        return False
                    raise
                return True
            done = retry_io(swap, f"taking over {self.where(OWNER)}")
            with contextlib.suppress(Exception):
                self.fs.invalidate_cache(path)
            return done
        aside = os.path.join(os.path.dirname(path), temp_name(".owner.") + ".stale")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return self._owner_create(data)
        try:
            with open(aside, "rb") as f:
                moved = f.read(MAX_SMALL_JSON_BYTES + 1)
            if moved != expect:  # a fresh record: not ours to take; put it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
                return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(aside)
        return self._owner_create(data)

    def _owner_put(self, data: bytes, etag: str | None) -> str | None:
        """Overwrite owner.json (the owner's heartbeat); S3: only if its ETag is still ``etag``. Returns the new
        ETag; raises FileExistsError when the condition failed (another run replaced it)."""
        path = self._path(OWNER)
        if self.is_local:
            retry_io(lambda: write_local_atomic(path, data), f"writing {self.where(OWNER)}")
            return None

        def put():
            try:
                out = self.fs.pipe_file(path, data, **({"IfMatch": etag} if etag else {}))
            except OSError as e:
                if _precondition_failed(e):
                    raise FileExistsError(str(e)) from None
                raise
            return out.get("ETag") if isinstance(out, dict) else None
        try:
            new = retry_io(put, f"writing {self.where(OWNER)}")
        except OSError as e:  # with_retries wraps permanent errors: unwrap the failed condition
            if isinstance(e.__cause__, FileExistsError):
                raise e.__cause__ from None
            raise
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)
        return new

    def _owner_remove(self) -> None:
        path = self._path(OWNER)
        if self.is_local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        with contextlib.suppress(FileNotFoundError):
            retry_io(lambda: self.fs.rm_file(path), f"removing {self.where(OWNER)}")
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)


def _owner_desc(doc: dict[str, Any] | None) -> str:
    if not doc:
        return "an unreadable owner record"
    hb = doc.get("heartbeat")
    age = f"{time.time() - hb:.0f} s ago" if isinstance(hb, (int, float)) and not isinstance(hb, bool) else "never"
    return (f"run {one_line(doc.get('run_id'), 40)} on host {one_line(doc.get('host'), 80)}, pid "
            f"{one_line(doc.get('pid'), 20)}, started {_iso(doc.get('started'))}, last heartbeat {age}")


def _lock_stale(doc: dict[str, Any] | None, stale_after: float) -> str | None:
    """Why the owner record ``doc`` no longer holds (None: its run is alive, or may be)."""
    if doc is None:
        return "its owner record is unreadable"
    pid, hb = doc.get("pid"), doc.get("heartbeat")
    if doc.get("host") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool):
        if pid == os.getpid():
            return "it was left by this process"
        if not pid_alive(pid):
            return f"its process {pid} has ended"
        start = doc.get("pid_start")
        if start is not None and pid_start(pid) not in (None, start):
            return f"its process {pid} has ended (the pid is now another process's)"
        return None  # alive on this host: never stale, however old its heartbeat
    if isinstance(hb, bool) or not isinstance(hb, (int, float)):
        return "it has no heartbeat"
    age = time.time() - hb
    if age > stale_after:
        return f"its heartbeat is {age:.0f} s old (over {stale_after:.0f} s)"
    return None


class RunLock:
    """This process's ownership of a run's ``out`` (``CheckpointStore.acquire_run_lock``). ``refresh`` rewrites
    the heartbeat (and raises :class:`RunLocked` if another run has taken the lock over meanwhile); ``release``
    removes the record if it is still this run's. A context manager: ``with store.acquire_run_lock(): ...``.

    Races (documented, not prevented): on a local disk ``refresh`` checks then replaces the record, so a run that
    takes over a lock it judged stale in between is overwritten, and the next ``refresh`` of one of the two
    fails; on S3 both the take-over and the refresh are conditional (``If-Match``) and exact."""

    def __init__(self, store: RunLockMixin, record: dict[str, Any], raw: bytes | None, etag: str | None,
                 stale_after: float):
        self.store, self.record, self.stale_after = store, dict(record), stale_after
        self._etag = etag
        self._last = time.monotonic()
        self.released = False

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    def refresh(self) -> None:
        """Rewrite the heartbeat; :class:`RunLocked` if the record is no longer this run's."""
        if self.released:
            return
        raw, doc, etag = self.store._owner_read()
        if doc is None or doc.get("run_id") != self.run_id:
            self.released = True
            raise RunLocked(f"the run lock {self.store.where(OWNER)} was taken over by "
                            f"{_owner_desc(doc) if raw is not None else 'nobody (it was removed)'}; this run stops "
                            "so that two runs never write one --out")
        self.record["heartbeat"] = time.time()
        data = json.dumps(self.record, sort_keys=True).encode()
        try:
            self._etag = self.store._owner_put(data, etag)
        except FileExistsError:
            raw, doc, _ = self.store._owner_read()
            if doc is None or doc.get("run_id") != self.run_id:
                self.released = True
                raise RunLocked(f"the run lock {self.store.where(OWNER)} was taken over by {_owner_desc(doc)}; "
                                "this run stops so that two runs never write one --out") from None
        self._last = time.monotonic()

    def maybe_refresh(self) -> None:
        """``refresh`` when a quarter of ``stale_after`` has passed since the last one (cheap: call every step)."""
        if time.monotonic() - self._last >= self.stale_after / 4:
            self.refresh()

    def release(self) -> None:
        """Remove the record if it is still this run's (idempotent)."""
        if self.released:
            return
        self.released = True
        _, doc, _ = self.store._owner_read()
        if doc is not None and doc.get("run_id") == self.run_id:
            self.store._owner_remove()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
