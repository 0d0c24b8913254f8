"""Generation workers: plain classes (no Ray here), wrapped as actors by the driver.

``GenerationWorker`` loads the teacher once and solves a shard's trajectories in batches
(``solve_payload``): the GPU process does nothing else. ``ShardCommitter`` (a second, I/O-bound
process) packs a solved shard into a deterministic WebDataset tar, uploads it, verifies the stored
size and sha256 and only then writes the shard's commit record. The driver pipes one into the other
through Ray's object store, so serialisation, hashing and upload of shard n overlap with the solve
of shard n+1 without competing for the solver's GIL. ``GenerationWorker.process_shard`` does both
in-process (no Ray) for tests, tools and benchmarks.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import numpy as np
import torch

from flowcore.solvers import seeded_noise, solve_teacher
from models.cache import cache_root
from models.registry import build_teacher
from pipeline.config import GenerateConfig
from pipeline.plan import ShardPlan
from pipeline.storage import ObjectStore
from storage_schemas import (
    TORCH_DTYPES,
    SampleRecord,
    ShardCommit,
    commit_relpath,
    sample_key,
    shard_relpath,
    utc_now_iso,
)
from storage_schemas import (
    shard_id as format_shard_id,
)
from storage_schemas.fetch import fetch_to_local
from storage_schemas.shard import write_shard_arrays


def resolve_teacher(spec: str, storage_options: dict[str, Any] | None, device: str, dtype: str | None = None,
                    resolution: int | None = None):
    """Build a teacher through ``models.registry``, fetching a remote flownet target into the local cache.
    ``dtype`` (a name: bfloat16, ...) is the teacher network's dtype, ``resolution`` a diffusers
    teacher's image size in pixels."""
    def fetch(url: str) -> str:
        return fetch_to_local(url, str(cache_root() / "teachers"), storage_options)

    return build_teacher(spec, device=device, dtype=None if dtype is None else TORCH_DTYPES[dtype],
                         resolution=resolution, fetch=fetch)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class GenerationWorker:
    """Solves and commits shards of one run (see module docstring). Testable without Ray."""

    def __init__(self, config: dict[str, Any], card_fingerprint: str | None = None, device: str | None = None):
        self.cfg = GenerateConfig(**config)
        threads = max(1, int(self.cfg.cpus_per_worker))
        torch.set_num_threads(threads)
        # TF32 would make GPU-made corpora irreproducible in float32 (audit --replay); solves stay in fp32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.device = device or default_device()
        self.teacher = resolve_teacher(self.cfg.teacher, self.cfg.storage_options, self.device,
                                       self.cfg.teacher_dtype, self.cfg.resolution)
        self._prompt_cache: dict[str, Any] = {}  # prompt text -> its condition, for the shard being solved
        self.card_fingerprint = card_fingerprint
        self.prompts = None
        if self.cfg.prompts:
            from pipeline.prompts import load_prompts

            self.prompts, _ = load_prompts(self.cfg.prompts, self.cfg.storage_options)
            self._check_prompt_encoding()
        self.plan = make_plan(self.cfg, self.teacher, self.prompts)

    def _check_prompt_encoding(self) -> None:
        """Encode the first prompt once at start-up, so a teacher that cannot encode prompts (no text
        encoders in its folder, a model without prompt conditioning) fails the job at once with the
        reason, instead of failing every shard through its retries."""
        encode = getattr(self.teacher, "encode_prompts", None)
        if encode is None:
            raise ValueError(f"--prompts given, but teacher {self.cfg.teacher} cannot encode prompts (it has no text "
                             "encoders); drop --prompts or use a diffusers pipeline folder with its text encoders")
        try:
            encode([self.prompts[0][1]])
        except (ValueError, NotImplementedError, OSError) as e:
            raise ValueError(f"--prompts given, but teacher {self.cfg.teacher} cannot encode them: {e}") from None

    # -- description used by the driver to write the dataset card ---------------------------
    def describe(self) -> dict[str, Any]:
        t = self.teacher
        return {
            "teacher": {"kind": t.config()["kind"], "fingerprint": t.fingerprint(), "config": t.config()},
            "sample_shape": list(t.sample_shape),
            "num_classes": t.num_classes,
            "classes": None if self.plan.classes is None else list(self.plan.classes),
            "device": self.device,
            "pid": os.getpid(),
        }

    def pid(self) -> int:
        return os.getpid()

    # -- the work ---------------------------------------------------------------------------
    def solve_states(self, number: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Authentic trajectories of shard ``number``: (states [N, K, *X] in the stored dtype, metas)."""
        cfg, dtype = self.cfg, TORCH_DTYPES[self.cfg.dtype]
        specs = self.plan.shard_samples(number)
        chunks, metas = [], []
        self._prompt_cache = {}  # embeddings are cached per shard (a shard cycles over a slice of the prompts)
        for start in range(0, len(specs), cfg.batch_size):
            batch = specs[start:start + cfg.batch_size]
            noise = seeded_noise([s.seed for s in batch], self.teacher.sample_shape, torch.float32, self.device)
            guidance = torch.tensor([s.guidance for s in batch], dtype=torch.float32, device=self.device)
            cond = self._condition(batch)
            traj = solve_teacher(self.teacher, noise, cfg.grid, cond=cond, guidance=guidance,
                                 method=cfg.solver, capture_sigmas=cfg.saved)
            states = traj.states_BKX.to("cpu", dtype)
            if not bool(torch.isfinite(states).all()):
                raise FloatingPointError(
                    f"teacher produced non-finite states in shard {number} (indices {batch[0].index}.."
                    f"{batch[-1].index}); try dtype float32 or a smaller guidance"
                )
            chunks.append(states)
            for s in batch:
                meta: dict[str, Any] = {"index": s.index, "seed": s.seed, "guidance": s.guidance}
                if s.class_id is not None:
                    meta["class_id"] = s.class_id
                if s.prompt_id is not None:
                    meta["prompt_id"], meta["prompt"] = s.prompt_id, s.prompt
                metas.append(meta)
        return torch.cat(chunks), metas

    def solve_shard(self, number: int) -> list[SampleRecord]:
        """Authentic trajectories of shard ``number`` as validated records, in index order."""
        states, metas = self.solve_states(number)
        sigmas = torch.tensor(self.cfg.saved, dtype=torch.float32)
        return [SampleRecord(sample_key(m["index"]), states[i].clone(), sigmas, m) for i, m in enumerate(metas)]

    def _condition(self, batch):
        if batch[0].class_id is not None:
            return torch.tensor([s.class_id for s in batch], dtype=torch.long, device=self.device)
        if batch[0].prompt is not None:
            encode = getattr(self.teacher, "encode_prompts", None)
            if encode is None:
                raise ValueError(f"teacher {self.cfg.teacher} cannot encode prompts (it has no text encoders)")
            texts = [s.prompt for s in batch]
            new = list(dict.fromkeys(t for t in texts if t not in self._prompt_cache))
            if new:  # one encoder call per batch, for the prompts this shard has not seen yet
                cond = encode(new)
                self._prompt_cache.update({t: cond.index(i) for i, t in enumerate(new)})
            return type(self._prompt_cache[texts[0]]).cat([self._prompt_cache[t] for t in texts])
        return None

    def shard_bytes(self, number: int) -> bytes:
        states, metas = self.solve_states(number)
        return write_shard_arrays(states, torch.tensor(self.cfg.saved, dtype=torch.float32), metas)

    def solve_payload(self, number: int) -> dict[str, Any]:
        """Solve shard ``number`` -> {number, states [N, K, *X], dtype, sigmas [K], metas, seconds}:
        what a ShardCommitter needs. ``states`` is a numpy array (see :func:`states_to_wire`): Ray
        moves it through the object store with one copy and the committer reads it in place."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        states, metas = self.solve_states(number)  # records are built and validated by the committer
        return {
            "number": number,
            "states": states_to_wire(states),
            "dtype": self.cfg.dtype,
            "sigmas": torch.tensor(self.cfg.saved, dtype=torch.float32),
            "metas": metas,
            "solve_seconds": time.perf_counter() - t0,
            "solve_cpu_seconds": time.thread_time() - cpu0,  # below solve_seconds: other processes ran
        }

    def solve_for_commit(self, number: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(payload for the committer, small status for the driver): called with ``num_returns=2`` so
        the driver learns that a solve finished without pulling the states out of the object store."""
        payload = self.solve_payload(number)
        return payload, {"number": number, "solve_seconds": payload["solve_seconds"],
                         "num_samples": len(payload["metas"])}

    def process_shard(self, number: int, card_fingerprint: str | None = None) -> dict[str, Any]:
        """Solve, pack, upload, verify and commit in this process. Returns the commit record as a dict."""
        fp = card_fingerprint or self.card_fingerprint
        if fp is None:
            raise RuntimeError("the dataset card must be written before shards are committed")
        return ShardCommitter(self.cfg.out, self.cfg.storage_options, niceness=0).commit(self.solve_payload(number), fp)


class ShardCommitter:
    """Packs, uploads, verifies and commits solved shards (I/O bound; see module docstring)."""

    def __init__(self, out: str, storage_options: dict[str, Any] | None = None, niceness: int = 5):
        self.store = ObjectStore(out, storage_options)
        if niceness and hasattr(os, "nice"):
            # background work: where it shares cores with a solver, the solver (which feeds the GPU) wins
            try:
                os.nice(niceness)
            except OSError:
                pass

    def commit(self, payload: dict[str, Any], card_fingerprint: str) -> dict[str, Any]:
        """Tar -> upload -> read-back verify (size, sha256) -> commit record. Returns the record as a dict.

        The tar is packed straight from the payload's arrays (``write_shard_arrays``): the same
        bytes and the same record checks as building a ``SampleRecord`` per sample, vectorised."""
        t0, cpu0 = time.perf_counter(), time.thread_time()
        states = states_from_wire(payload["states"], payload.get("dtype"))
        sigmas, metas = payload["sigmas"], payload["metas"]
        data = write_shard_arrays(states, sigmas, metas)  # validates every sample; raises naming it
        sid = format_shard_id(payload["number"])
        sha, nbytes = self.store.put_verified(shard_relpath(sid), data)
        first, last = metas[0], metas[-1]
        commit = ShardCommit(
            shard_id=sid, path=shard_relpath(sid), sha256=sha, num_bytes=nbytes,
            num_samples=len(metas), first_index=int(first["index"]), last_index=int(last["index"]),
            seed=int(first["seed"]), card_fingerprint=card_fingerprint, committed_at=utc_now_iso(),
        )
        # the commit record is written only after the verified upload: it is the commit point
        self.store.write_bytes(commit_relpath(sid), commit.to_json().encode())
        out = commit.to_dict()
        out["_solve_seconds"] = payload.get("solve_seconds", 0.0)
        out["_solve_cpu_seconds"] = payload.get("solve_cpu_seconds", 0.0)
        out["_commit_seconds"] = time.perf_counter() - t0
        out["_commit_cpu_seconds"] = time.thread_time() - cpu0
        return out

    def pid(self) -> int:
        return os.getpid()


def states_to_wire(states: torch.Tensor) -> np.ndarray:
    """The solved states as a numpy array for Ray's object store (numpy travels with one copy and is
    read in place; a torch tensor is pickled through its storage). bfloat16, which numpy lacks,
    travels as its raw 16-bit patterns (int16)."""
    states = states.detach().cpu().contiguous()
    return (states.view(torch.int16) if states.dtype == torch.bfloat16 else states).numpy()


def states_from_wire(states: np.ndarray | torch.Tensor, dtype: str | None) -> torch.Tensor:
    """Inverse of :func:`states_to_wire` (a tensor is returned as is). The array may be read-only
    (it lives in the object store): the tensor is only read."""
    if isinstance(states, torch.Tensor):
        return states
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(states)
    if dtype == "bfloat16":
        if tensor.dtype != torch.int16:
            raise TypeError(f"bfloat16 states travel as int16 bit patterns, found {tensor.dtype}")
        return tensor.view(torch.bfloat16)
    return tensor


def make_plan(cfg: GenerateConfig, teacher, prompts) -> ShardPlan:
    classes = cfg.classes
    if prompts is None and teacher.num_classes is not None:
        if classes is None:
            classes = tuple(range(teacher.num_classes))
        bad = [c for c in classes if not 0 <= c < teacher.num_classes]
        if bad:
            raise ValueError(f"classes {bad} are outside the teacher's {teacher.num_classes} classes")
    elif classes is not None and prompts is None:
        raise ValueError(f"teacher {cfg.teacher} is not class-conditional; drop --classes")
    return ShardPlan(cfg.num_trajectories, cfg.shard_size, cfg.base_seed, cfg.guidance,
                     None if prompts is not None else classes, prompts)
