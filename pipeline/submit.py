"""`trajflow submit`: run `trajflow generate` on a running Ray cluster through the Ray Jobs API.

The job's entrypoint is ``trajflow generate --address auto --no-progress <generate arguments>``: the
driver runs on the cluster (head node), connects to that cluster, and writes the corpus to the
``--out`` URL from there. The generate arguments are checked here first (unknown flags, bad types,
missing required values, an invalid grid...) so obvious mistakes fail in a second instead of after
a cluster round trip; files and teachers are resolved on the cluster.

Submission ids are stable: ``trajflow-generate-<sha256 of the normalised generate arguments>[:12]``
(or ``--submission-id``). Submitting the same command again therefore *attaches* to the job that is
already running or already succeeded instead of starting a second copy. If the latest attempt
FAILED or was STOPPED, a new attempt ``<id>-r2``, ``-r3``, ... is submitted; it resumes from the
corpus's commit records (committed shards are skipped), so no work is repeated or lost.

Credentials are never sent: the runtime_env only ever carries non-secret settings (the S3 endpoint
and region pass through from this environment). The cluster gets its credentials from its own
environment (IAM role, instance profile, Kubernetes Secret); see docs/cluster.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SUBMISSION_PREFIX = "trajflow-generate-"
#: metadata key holding the hash of the normalised generate arguments (identifies "the same command")
ARGS_KEY = "trajflow_args_sha256"
#: non-secret settings copied from the local environment into the job's env_vars when set here
PASS_THROUGH_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
#: never shipped in a runtime_env (it is stored in plain text on the cluster and shown by the dashboard)
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_KEY|ACCESS_KEY", re.I)
_SECRET_OPTION = re.compile(r"^(key|secret|token|password|passwd|session_token|access_key|secret_key|"
                            r"aws_access_key_id|aws_secret_access_key|aws_session_token|credentials?|"
                            r"private_key|api_key)$", re.I)
WORKING_DIR_EXCLUDES = [".venv", ".git", "__pycache__", "*.tar", "demo_out"]
TERMINAL_OK = "SUCCEEDED"
TERMINAL_BAD = ("FAILED", "STOPPED")
_ATTEMPT = re.compile(r"-r(\d+)$")

# The type of each generate flag's value, by GenerateConfig field annotation (flags not listed: text).
_ANNOTATION_TYPES = {
    "int": "int",
    "int | None": "int",
    "float": "float",
    "float | None": "float",
    "tuple[int, ...]": "ints",
    "tuple[int, ...] | None": "ints",
    "tuple[float, ...]": "floats",
    "tuple[float, ...] | None": "floats",
    "dict[str, Any]": "json",
    "bool": "flag",  # e.g. --verify-sha256: a flag without a value, forwarded as is
}


class SubmitUsageError(ValueError):
    """Bad submit usage: exit status 2."""


class SubmitFailed(RuntimeError):
    """The cluster could not be reached or refused the job: exit status 1."""


def _err(msg: str) -> None:
    print(f"trajflow submit: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# the generate arguments


def generate_flags() -> dict[str, tuple[str, str]]:
    """``--flag`` -> (GenerateConfig field or special name, value kind) for every generate flag."""
    from pipeline.config import config_fields

    flags: dict[str, tuple[str, str]] = {}
    for name, f in config_fields().items():
        if name == "progress":
            continue
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        flags["--" + name.replace("_", "-")] = (name, _ANNOTATION_TYPES.get(annotation, "str"))
    flags["--config"] = ("config", "str")
    flags["--no-progress"] = ("no_progress", "flag")
    return flags


def _convert(flag: str, kind: str, text: str) -> Any:
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "ints":
            return [int(p) for p in text.split(",") if p.strip()]
        if kind == "floats":
            return [float(p) for p in text.split(",") if p.strip()]
        if kind == "json":
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("must be a JSON object")
            return value
    except (ValueError, json.JSONDecodeError) as e:
        raise SubmitUsageError(f"generate argument {flag}: invalid value {text!r} ({e})") from None
    return text


@dataclass
class GenerateArgs:
    """The generate arguments of a submit, parsed just enough to check, hash and forward them."""

    values: dict[str, Any] = field(default_factory=dict)  # field name -> converted value (last wins)
    tokens: list[str] = field(default_factory=list)  # what is forwarded (without --address/--no-progress)
    ignored: list[str] = field(default_factory=list)

    def normalised(self) -> str:
        return json.dumps(self.values, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.normalised().encode()).hexdigest()

    def entrypoint(self) -> str:
        return shlex.join(["trajflow", "generate", "--address", "auto", "--no-progress", *self.tokens])


def parse_generate_args(argv: list[str]) -> GenerateArgs:
    """Parse ``trajflow generate`` arguments the way argparse would (``--flag value``, ``--flag=value``,
    unambiguous prefixes), without importing the CLI. Raises SubmitUsageError on bad usage."""
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    flags = generate_flags()
    out = GenerateArgs()
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise SubmitUsageError(f"unexpected generate argument {token!r} (generate takes only --flags; "
                                   "run `trajflow generate --help`)")
        name, eq, inline = token.partition("=")
        if name not in flags:
            matches = [f for f in flags if f.startswith(name)]
            if len(matches) != 1:
                hint = f" (ambiguous: {', '.join(sorted(matches))})" if matches else ""
                raise SubmitUsageError(f"unknown generate argument {name}{hint}; see `trajflow generate --help`")
            name = matches[0]
        field_name, kind = flags[name]
        if kind == "flag":
            if eq:
                raise SubmitUsageError(f"generate argument {name} takes no value")
            consumed = [token]
            value: Any = True
        elif eq:
            consumed, value = [token], inline
        else:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and argv[i + 1] != "--"):
                raise SubmitUsageError(f"generate argument {name} expects a value")
            consumed, value = [token, argv[i + 1]], argv[i + 1]
        i += len(consumed)
        if field_name in ("address", "no_progress"):
            # the job always runs `--address auto --no-progress` on its own cluster
            if field_name == "address":
                out.ignored.append(" ".join(consumed))
            continue
        out.values[field_name] = _convert(name, kind, value)
        out.tokens += consumed
    return out


def check_generate_args(gen: GenerateArgs) -> None:
    """Light local validation; the job does the full one (files and teachers live on the cluster)."""
    from pipeline.config import build_config, load_config_file

    opts = gen.values.get("storage_options") or {}
    leaked = sorted(_secret_option_keys(opts))
    if leaked:
        raise SubmitUsageError(
            f"--storage-options holds credentials ({', '.join(leaked)}): a submitted job's command line is "
            "stored in plain text on the cluster. Give the cluster its credentials through its own "
            "environment (IAM role, Kubernetes Secret); see docs/cluster.md")
    values = {k: v for k, v in gen.values.items() if k != "config"}
    file_values: dict[str, Any] = {}
    config = gen.values.get("config")
    if config is not None:
        if not Path(config).is_file():
            _err(f"note: config file {config} is not on this machine; it must exist on the cluster "
                 "(only the flags were checked here)")
            return
        try:
            file_values = load_config_file(config)
        except (ValueError, FileNotFoundError) as e:
            raise SubmitUsageError(str(e)) from None
    try:
        build_config(file_values, values)
    except (ValueError, TypeError) as e:
        raise SubmitUsageError(f"bad generate arguments: {e}") from None


def _secret_option_keys(obj: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and _SECRET_OPTION.match(k):
                found.add(k)
            found |= _secret_option_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            found |= _secret_option_keys(v)
    return found


def stable_submission_id(gen: GenerateArgs) -> str:
    return SUBMISSION_PREFIX + gen.digest()[:12]


# ------------------------------------------------------------------------------------------------
# runtime_env


def load_runtime_env(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise SubmitUsageError(f"runtime_env file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            env = json.loads(text)
        else:
            import yaml

            env = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise SubmitUsageError(f"runtime_env file {p} does not parse: {e}") from None
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise SubmitUsageError(f"runtime_env file {p} must hold a mapping (working_dir, env_vars, pip, ...)")
    return env


def build_runtime_env(file_env: dict[str, Any], working_dir: str | None,
                      environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime_env: the file's, plus --working-dir (with excludes) and the non-secret
    S3 settings of this environment. Refuses secrets (SubmitUsageError)."""
    environ = os.environ if environ is None else environ
    env = dict(file_env)
    env_vars = dict(env.get("env_vars") or {})
    if not isinstance(env_vars, dict):
        raise SubmitUsageError("runtime_env env_vars must be a mapping of NAME: value")
    secrets = sorted(k for k in env_vars if _SECRET_NAME.search(str(k)))
    if secrets:
        raise SubmitUsageError(
            f"the runtime_env carries secrets ({', '.join(secrets)}); runtime_envs are stored in plain text on "
            "the cluster. Give the cluster its credentials through its own environment (IAM role, "
            "Kubernetes Secret); see docs/cluster.md")
    for name in PASS_THROUGH_ENV:
        if environ.get(name) and name not in env_vars:
            env_vars[name] = environ[name]
    if env_vars:
        env["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    if working_dir:
        env["working_dir"] = working_dir
    wd = env.get("working_dir")
    if wd and "://" not in str(wd):
        if not Path(wd).is_dir():
            raise SubmitUsageError(f"working_dir {wd} is not a directory")
        excludes = list(env.get("excludes") or [])
        env["excludes"] = excludes + [e for e in WORKING_DIR_EXCLUDES if e not in excludes]
    return env


def describe_runtime_env(env: dict[str, Any]) -> str:
    """A one-line description that never shows env var values."""
    parts = []
    for k, v in env.items():
        if k == "env_vars":
            parts.append(f"env_vars: {', '.join(sorted(v))} (values not shown)")
        elif k == "excludes":
            continue
        elif isinstance(v, (str, int, float)):
            parts.append(f"{k}={v}")
        else:
            parts.append(k)
    return "; ".join(parts) or "(none)"


# ------------------------------------------------------------------------------------------------
# the cluster


def normalise_address(address: str) -> str:
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    scheme = urlsplit(address).scheme
    if scheme not in ("http", "https"):
        raise SubmitUsageError(
            f"--address {address} is not a dashboard address: submit talks to the Ray dashboard over HTTP, "
            "e.g. http://HEAD:8265 (not ray://, not the GCS port 6379)")
    return address


def _probe(address: str, timeout: float = 10.0) -> None:
    """Fail fast (instead of a long TCP timeout) when nothing listens at the dashboard address."""
    u = urlsplit(address)
    host = u.hostname or "127.0.0.1"
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError as e:
        raise SubmitUsageError(f"--address {address}: {e}") from None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise SubmitFailed(_unreachable(address, e)) from None


def _unreachable(address: str, e: BaseException) -> str:
    return (f"cannot reach the Ray dashboard at {address} ({type(e).__name__}: {e}). Is the head running, and "
            "is this its dashboard address (http://HEAD:8265, printed by `ray start --head`)?")


def _auth_help(address: str) -> str:
    return (f"the Ray cluster at {address} requires token authentication. Run with RAY_AUTH_MODE=token and the "
            "cluster's token in RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token); "
            "`ray get-auth-token` on the head prints it. See docs/cluster.md")


def connect(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _probe(address)
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise SubmitFailed(_auth_help(address)) from None
    except (ConnectionError, OSError, RuntimeError, ValueError) as e:
        raise SubmitFailed(_unreachable(address, e)) from None


def _status(job) -> str:
    return str(getattr(job.status, "value", job.status))


def _attempt(submission_id: str, base: str) -> int:
    if submission_id == base:
        return 1
    m = _ATTEMPT.search(submission_id)
    return int(m.group(1)) if m and submission_id[: m.start()] == base else 0


def find_attempts(client, base: str) -> list:
    """Jobs on the cluster with submission id ``base`` or ``base-rN``, oldest attempt first."""
    jobs = [j for j in client.list_jobs() if j.submission_id and _attempt(j.submission_id, base)]
    return sorted(jobs, key=lambda j: _attempt(j.submission_id, base))


def _same_command(job, digest: str) -> bool:
    return (job.metadata or {}).get(ARGS_KEY) == digest


def _is_terminal(status: str) -> bool:
    return status == TERMINAL_OK or status in TERMINAL_BAD


def _follow_hint(address: str, sid: str) -> str:
    return (f"follow it:  ray job logs --follow --address {address} {sid}\n"
            f"status:     ray job status --address {address} {sid}\n"
            f"stop it:    ray job stop --address {address} {sid}")


async def _tail(client, sid: str, printed: list[int]) -> None:
    async for chunk in client.tail_job_logs(sid):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        printed[0] += len(chunk)


async def _follow(client, sid: str, printed: list[int], poll_s: float) -> None:
    """Stream the logs while polling the status: the server closes the stream only a few seconds after
    the job ends, so stop it ourselves once the job is over (the rest is fetched in one request)."""
    tail = asyncio.ensure_future(_tail(client, sid, printed))
    try:
        while not tail.done():
            await asyncio.wait({tail}, timeout=poll_s)
            if tail.done():
                break
            status = await asyncio.to_thread(lambda: _status(client.get_job_info(sid)))
            if _is_terminal(status):
                await asyncio.wait({tail}, timeout=1.0)
                break
    finally:
        if not tail.done():
            tail.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await tail
    if not tail.cancelled() and tail.exception() is not None:
        raise tail.exception()


def wait_for_job(client, sid: str, poll_s: float = 1.0) -> str:
    """Stream the job's logs to stdout until it ends; return its terminal status."""
    printed = [0]
    if not _is_terminal(_status(client.get_job_info(sid))):
        # a finished job's logs come faster in one request than through the tail websocket
        try:
            asyncio.run(_follow(client, sid, printed, poll_s))
        except Exception as e:  # the websocket dropped (proxy, head restart): fall back to polling
            _err(f"log stream interrupted ({type(e).__name__}: {e}); polling the job instead")
    while True:
        status = _status(client.get_job_info(sid))
        if _is_terminal(status):
            break
        logs = client.get_job_logs(sid)
        if len(logs) > printed[0]:
            sys.stdout.write(logs[printed[0]:])
            sys.stdout.flush()
            printed[0] = len(logs)
        time.sleep(poll_s)
    try:
        logs = client.get_job_logs(sid)
        if len(logs) > printed[0]:
            sys.stdout.write(logs[printed[0]:])
            sys.stdout.flush()
    except RuntimeError:
        pass
    return status


def _final_line(client, sid: str, status: str) -> str:
    info = client.get_job_info(sid)
    line = f"job {sid} {status}"
    if info.start_time and info.end_time:
        line += f" after {(info.end_time - info.start_time) / 1000:.1f}s"
    # Ray appends the last logs to a failed job's message; they were streamed already
    message = (info.message or "").split(", last available logs")[0].strip().splitlines()
    if status != TERMINAL_OK and message:
        line += f": {message[0]}"
    return line


# ------------------------------------------------------------------------------------------------
# the command


def submit_generate(args: argparse.Namespace) -> int:
    """`trajflow submit`: 0 submitted (or, with --wait, SUCCEEDED); 1 failed/unreachable; 2 bad usage."""
    try:
        return _submit(args)
    except SubmitUsageError as e:
        _err(f"error: {e}")
        return 2
    except SubmitFailed as e:
        _err(f"error: {e}")
        return 1


def _submit(args: argparse.Namespace) -> int:
    gen = parse_generate_args(list(args.generate_args or []))
    if not gen.values:
        raise SubmitUsageError("no generate arguments: put them after `--`, e.g. trajflow submit --address "
                               "http://HEAD:8265 --wait -- --teacher gmm:latent10 --num-trajectories 4096 "
                               "--out s3://bucket/corpus")
    for ignored in gen.ignored:
        _err(f"note: ignoring `{ignored}` in the generate arguments: the job runs on the cluster with --address auto")
    check_generate_args(gen)
    runtime_env = build_runtime_env(load_runtime_env(args.runtime_env), args.working_dir)
    address = normalise_address(args.address)
    base = args.submission_id or stable_submission_id(gen)
    if _ATTEMPT.search(base) and args.submission_id:
        raise SubmitUsageError(f"--submission-id {base} must not end in -rN (reserved for retry attempts)")
    digest = gen.digest()
    entrypoint = gen.entrypoint()

    client = connect(address)
    if not getattr(args, "verbose", False):  # after importing ray, which sets up its loggers
        import logging

        logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    from ray.exceptions import AuthenticationError

    try:
        sid = _submit_or_attach(client, base, digest, entrypoint, runtime_env, address)
        print(f"submission id: {sid}", flush=True)
        if not args.wait:
            print(_follow_hint(address, sid), flush=True)
            return 0
        try:
            status = wait_for_job(client, sid)
        except KeyboardInterrupt:
            _err(f"stopped following job {sid}; it keeps running on the cluster.\n{_follow_hint(address, sid)}")
            return 130
        print(_final_line(client, sid, status), flush=True)
        return 0 if status == TERMINAL_OK else 1
    except AuthenticationError:
        raise SubmitFailed(_auth_help(address)) from None
    except OSError as e:  # ConnectionError, requests' errors: the head went away mid-way
        raise SubmitFailed(_unreachable(address, e)) from None
    except RuntimeError as e:  # the SDK's "Request failed with status code ..."
        raise SubmitFailed(f"the Ray Jobs API at {address} failed: {e}") from None


def _submit_or_attach(client, base: str, digest: str, entrypoint: str, runtime_env: dict[str, Any],
                      address: str) -> str:
    attempts = find_attempts(client, base)
    if attempts:
        latest = attempts[-1]
        sid, status = latest.submission_id, _status(latest)
        if not _same_command(latest, digest):
            raise SubmitUsageError(
                f"submission id {sid} is already used on this cluster by a different command "
                f"(see `ray job status --address {address} {sid}`); pick another --submission-id")
        if status not in TERMINAL_BAD:
            _err(f"job {sid} already exists ({status}); attaching to it instead of submitting it again")
            return sid
        sid = f"{base}-r{_attempt(sid, base) + 1}"
        _err(f"the last attempt {latest.submission_id} ended {status}; submitting {sid}, which resumes from the "
             "corpus's commit records (committed shards are skipped)")
    else:
        sid = base
    _err(f"submitting to {address}: {entrypoint}")
    _err(f"runtime_env: {describe_runtime_env(runtime_env)}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        tf_version = version("trajflow")
    except PackageNotFoundError:
        tf_version = "source"
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env or None,
                          metadata={ARGS_KEY: digest, "trajflow_submitter_version": tf_version})
    except (RuntimeError, ValueError) as e:
        # Ray 2.60: the job server answers 400 "Job with submission_id ... already exists" (RuntimeError
        # from the SDK) when another submit won the race for this id: attach to that one.
        if "already exists" not in str(e):
            raise SubmitFailed(f"the cluster refused the job: {e}") from None
        status = _status(client.get_job_info(sid))
        _err(f"job {sid} already exists ({status}); attaching to it instead of submitting it again")
        return sid
    _err(f"submitted job {sid}")
    return sid
