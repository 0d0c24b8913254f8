"""A fault-injecting HTTP reverse proxy for S3 tests (loopback only).

Sits on ``127.0.0.1`` (an ephemeral port) in front of an S3-compatible server (moto in the tests)
and forwards every request unchanged -- method, path and query, headers (the ``Host`` header the
client sent, which SigV4 signed, is kept) and body -- then relays the upstream's status, headers
and body. A :class:`FaultPolicy` decides, per request, whether to inject a fault instead:

* ``error``: answer with an S3 XML error (``503 SlowDown`` or ``500 InternalError``) without
  contacting the upstream (the request body is read first, so the connection stays usable);
* ``corrupt``: forward, then flip one byte of the response body (same length);
* ``truncate``: forward, then return only half the body with a matching ``Content-Length``;
* ``drop``: forward, then announce the full ``Content-Length`` but close the connection half way.

Decisions are deterministic: a rule's probabilistic choice is a hash of (seed, rule, method, path,
the how-many-th request for that method+path it is), so it does not depend on how concurrent
requests interleave. ``max_consecutive`` caps how many times in a row one rule fails the same
method+path, so a fractional fault rate can never exhaust a client's retries by bad luck.

Nothing here opens a connection to anything but the upstream URL given, which must be loopback.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}
ACTIONS = ("error", "corrupt", "truncate", "drop")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
              "upgrade", "expect"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class FaultRule:
    """Inject ``action`` into requests matching ``methods`` (None: any) and ``path`` (a regex searched
    in the request path, without the query; None: any).

    ``rate`` is the fraction of matching requests hit (1.0: every one -- "a request that keeps
    failing"); ``first`` restricts the rule to the first ``first`` requests for each method+path
    (e.g. ``first=1, rate=1.0``: every object's first upload fails once); ``statuses`` are cycled
    (deterministically) for ``action="error"``; ``limit`` caps
    the total injections of this rule (None: no cap); ``max_consecutive`` caps how many requests in
    a row for one method+path this rule may hit before one is let through (None: no cap).
    """

    action: str = "error"
    rate: float = 1.0
    methods: tuple[str, ...] | None = None
    path: str | None = None
    statuses: tuple[int, ...] = (503,)
    first: int | None = None
    limit: int | None = None
    max_consecutive: int | None = None
    name: str = ""
    _pattern: re.Pattern | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")
        bad = [s for s in self.statuses if s not in ERRORS]
        if bad:
            raise ValueError(f"statuses {bad} not supported; use {sorted(ERRORS)}")
        self.methods = None if self.methods is None else tuple(m.upper() for m in self.methods)
        self._pattern = None if self.path is None else re.compile(self.path)

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self._pattern is None or bool(self._pattern.search(path))


@dataclass(frozen=True)
class Fault:
    action: str
    status: int = 0
    rule: str = ""


class FaultPolicy:
    """Thread-safe, deterministic fault decisions with counters for assertions.

    ``counts`` maps (rule name, action, method) -> injected faults; ``requests`` counts every request
    seen by (method); ``log`` lists (method, path, fault-or-None) in arrival order.
    """

    def __init__(self, rules: list[FaultRule] | tuple[FaultRule, ...] = (), *, seed: int = 0):
        self.rules = list(rules)
        for i, r in enumerate(self.rules):
            if not r.name:
                r.name = f"rule{i}"
        self.seed = seed
        self._lock = threading.Lock()
        self._seen: Counter = Counter()  # (method, path) -> requests so far
        self._streak: Counter = Counter()  # (rule, method, path) -> consecutive hits
        self._hits: Counter = Counter()  # rule -> injections so far
        self.counts: Counter = Counter()
        self.requests: Counter = Counter()
        self.log: list[tuple[str, str, Fault | None]] = []
        self.times: list[float] = []  # arrival time (time.monotonic()) of each log entry
        self.enabled = True

    # -- decisions ---------------------------------------------------------------------------
    def _draw(self, rule: FaultRule, method: str, path: str, nth: int) -> float:
        h = hashlib.sha256(f"{self.seed}|{rule.name}|{method}|{path}|{nth}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    def decide(self, method: str, path: str) -> Fault | None:
        method = method.upper()
        with self._lock:
            key = (method, path)
            nth = self._seen[key]
            self._seen[key] += 1
            self.requests[method] += 1
            fault = None
            if self.enabled:
                for rule in self.rules:
                    if not rule.matches(method, path):
                        continue
                    skey = (rule.name, method, path)
                    hit = self._draw(rule, method, path, nth) < rule.rate
                    if hit and rule.first is not None and nth >= rule.first:
                        hit = False
                    if hit and rule.limit is not None and self._hits[rule.name] >= rule.limit:
                        hit = False
                    if hit and rule.max_consecutive is not None and self._streak[skey] >= rule.max_consecutive:
                        hit = False
                    if not hit:
                        self._streak[skey] = 0
                        continue
                    self._streak[skey] += 1
                    self._hits[rule.name] += 1
                    status = 0
                    if rule.action == "error":
                        status = rule.statuses[(self._hits[rule.name] - 1) % len(rule.statuses)]
                    fault = Fault(rule.action, status, rule.name)
                    self.counts[(rule.name, rule.action, method)] += 1
                    break
            self.log.append((method, path, fault))
            self.times.append(time.monotonic())
            return fault

    # -- reporting ---------------------------------------------------------------------------
    def total(self, *, rule: str | None = None, action: str | None = None, method: str | None = None) -> int:
        with self._lock:
            return sum(n for (r, a, m), n in self.counts.items()
                       if (rule is None or r == rule) and (action is None or a == action)
                       and (method is None or m == method))

    def requests_to(self, pattern: str, method: str | None = None) -> list[tuple[str, str, Fault | None]]:
        rx = re.compile(pattern)
        with self._lock:
            return [e for e in self.log if rx.search(e[1]) and (method is None or e[0] == method.upper())]

    def summary(self) -> dict:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "faults": {f"{r}:{a}:{m}": n for (r, a, m), n in sorted(self.counts.items())},
            }


def _error_body(status: int, path: str, request_id: str) -> bytes:
    code, message = ERRORS[status]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{path}</Resource>"
        f"<RequestId>{request_id}</RequestId><HostId>s3-fault-proxy</HostId></Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and automatic "100 Continue" for Expect headers
    server: _ProxyServer

    def log_message(self, format, *args):  # noqa: A002 - silence per-request logging
        pass

    def setup(self):
        super().setup()
        self.server.track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)
            conn = getattr(self.server.local, "conn", None)  # this thread serves this one client
            if conn is not None:
                conn.close()
                self.server.local.conn = None

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _upstream(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes):
        """One request to the upstream on this thread's keep-alive connection (reconnect once)."""
        local = self.server.local
        for attempt in (1, 2):
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection(self.server.upstream_host,
                                                               self.server.upstream_port, timeout=60)
            try:
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                if body or method in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            except (http.client.HTTPException, OSError):
                conn.close()
                local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _handle(self):
        method = self.command
        target = self.path
        path = urlsplit(target).path
        body = self._read_body()
        fault = self.server.policy.decide(method, path)
        if fault is not None and fault.action == "error":
            payload = _error_body(fault.status, path, f"fault-{self.server.next_id()}")
            self.send_response(fault.status, ERRORS[fault.status][0])
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)
            return
        headers = [(k, v) for k, v in self.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
        try:
            status, reason, resp_headers, data = self._upstream(method, target, headers, body)
        except (http.client.HTTPException, OSError) as e:
            payload = f"upstream unreachable: {type(e).__name__}".encode()
            self.send_response(502, "Bad Gateway")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        mangle = fault is not None and method == "GET" and 200 <= status < 300 and len(data) > 1
        declared = len(data)
        if mangle and fault.action == "corrupt":
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
        elif mangle and fault.action == "truncate":
            data = data[: len(data) // 2]
            declared = len(data)
        self.send_response(status, reason)
        for k, v in resp_headers:
            kl = k.lower()
            if kl in HOP_BY_HOP or kl == "content-length" or kl in ("date", "server"):
                continue
            if mangle and kl in ("etag", "content-md5") or (mangle and kl.startswith("x-amz-checksum")):
                continue  # a mangled body must not carry checksums that would give it away early
            self.send_header(k, v)
        if method == "HEAD":
            cl = next((v for k, v in resp_headers if k.lower() == "content-length"), "0")
            self.send_header("Content-Length", cl)
            self.end_headers()
            return
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        if mangle and fault.action == "drop":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: str, policy: FaultPolicy):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK:
            raise ValueError(f"upstream must be http:// on loopback, got {upstream!r}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.policy = policy
        self.local = threading.local()
        self._ids = 0
        self._id_lock = threading.Lock()
        self._active: set[socket.socket] = set()
        self.handler_errors = 0
        super().__init__(("127.0.0.1", 0), _Handler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._id_lock:
            (self._active.add if alive else self._active.discard)(conn)

    def close_clients(self) -> None:
        """Cut every client connection still open (keep-alive), so nothing is served after stop."""
        with self._id_lock:
            active, self._active = list(self._active), set()
        for conn in active:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):  # a client that went away: not worth a traceback
        self.handler_errors += 1

    def next_id(self) -> int:
        with self._id_lock:
            self._ids += 1
            return self._ids


class S3FaultProxy:
    """``with S3FaultProxy(moto_url, FaultPolicy([...])) as proxy: ... proxy.url ...``"""

    def __init__(self, upstream: str, policy: FaultPolicy | None = None):
        self.policy = policy or FaultPolicy()
        self._server = _ProxyServer(upstream, self.policy)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> S3FaultProxy:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                            name="s3-fault-proxy", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.close_clients()
        self._server.server_close()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
