"""The validation split while training: load it once, evaluate the student's few-step sampler on it.

``trajflow generate`` sets aside the last shards of its plan as the validation split
(``card.validation_shard_ids``); the training stream never reads them (``open_corpus(split="train")``).
Each stored trajectory holds the teacher's states from the noise (sigma = 1) to its endpoint (sigma = 0)
with its condition, so the student can be judged against the teacher *without running the teacher*,
for every teacher kind (diffusers ones included):

- ``coupling_error``: the student's N-step Euler sample from the stored noise and condition vs the
  stored teacher endpoint (per-dimension RMS, ``flowcore.metrics.coupling_error``): does the student
  still map each noise to the teacher's sample?
- ``swd``: sliced Wasserstein distance between those samples and the stored endpoints (distribution).
- ``window_errors``: the one-jump error of each window (start state -> one Euler step of the student ->
  vs the stored end state), which shows a window that failed to train (docs/math.md's pitfall).

N is a stage's window count; the window boundaries are stored solver states, so the student's grid is
the corrected few-step grid of the corpus (``few_step_sigmas(N, shift)``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flowcore.metrics import coupling_error, sliced_wasserstein
from flowcore.solvers import euler_walk
from flowcore.windows import stage_boundary_indices
from storage_schemas.shard import iter_shard_samples
from storage_schemas.split import check_split_consistency, read_manifest_bytes, validation_guard
from trainer.data import open_corpus
from trainer.shard_cache import CorruptShardError, ShardCache

log = logging.getLogger(__name__)

#: at most this many validation trajectories are evaluated (the split's first ones, in shard order)
MAX_VALIDATION_SAMPLES = 256


@dataclass
class ValidationSet:
    """The validation trajectories as one batch in the trainer's batch layout (``batch``: states [V, K, *X],
    sigmas [V, K], class_id [V] (-1: none), guidance [V], prompt (list, prompt corpora), valid [V])."""

    batch: dict[str, Any]
    shard_ids: list[str]
    skipped: int = 0
    """Samples left out because they are not validation data (``on_corrupt="skip"``)."""

    @property
    def size(self) -> int:
        return int(self.batch["states"].shape[0])


def load_validation(url: str, storage_options: dict[str, Any] | None = None, *, cache_dir: str | None = None,
                    max_samples: int = MAX_VALIDATION_SAMPLES, on_corrupt: str = "error") -> ValidationSet | None:
    """The corpus's validation split (sha256-verified fetches through the shard cache), or None when the
    corpus has none (generated with ``--validation-trajectories 0``, or before the split existed).

    The split must be validation data (``storage_schemas.split``): the card and the manifest's
    ``trajflow.split`` must agree (else ``SplitError``/``SchemaError``, one line), and a validation shard
    or sample that is training data (a training shard's bytes, range or indices, a seed not the card's
    rule gives) raises ``CorruptShardError`` naming the shard, or with ``on_corrupt="skip"`` is left out
    with a warning (None when nothing is left)."""
    if on_corrupt not in ("error", "skip"):
        raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
    corpus = open_corpus(url, storage_options, split="all")
    check_split_consistency(corpus.card, read_manifest_bytes(corpus.url, storage_options))
    held_out = set(corpus.card.validation_shard_ids)
    shards = [c for c in corpus.shards if c.shard_id in held_out]
    if not shards:
        return None
    guard = validation_guard(corpus.card, corpus.shards)

    def refuse(shard_id: str, reason: str, count: int) -> None:
        if on_corrupt == "error":
            raise CorruptShardError(shard_id, f"{reason} (--on-corrupt skip evaluates without it)")
        log.warning("skipping %d validation sample(s) of %s (on_corrupt='skip'): %s", count, shard_id, reason)

    cache = ShardCache(corpus.url, storage_options, cache_dir=cache_dir, verify_sha256=True)
    records, used, skipped = [], [], 0
    for commit in shards:
        problem = guard.shard_problem(commit)
        if problem is not None:
            refuse(commit.shard_id, problem, commit.num_samples)
            skipped += commit.num_samples
            continue
        used.append(commit.shard_id)
        if len(records) >= max_samples:
            continue  # the shard-level checks above still run for every validation shard
        with open(cache.get(commit), "rb") as f:
            data = f.read()
        bad, first_bad = 0, None
        for rec in iter_shard_samples(data, commit.shard_id, corpus.card):
            problem = guard.sample_problem(commit, rec.index, rec.seed)
            if problem is not None:
                if on_corrupt == "error":
                    refuse(commit.shard_id, problem, 1)
                bad, first_bad = bad + 1, first_bad or problem
                continue
            records.append(rec)
            if len(records) >= max_samples:
                break
        if bad:
            refuse(commit.shard_id, f"{bad} sample(s) are not validation data; first: {first_bad}", bad)
            skipped += bad
    if not records:
        log.warning("no validation sample is left after skipping %d: no evaluation while training", skipped)
        return None
    batch: dict[str, Any] = {
        "states": torch.stack([r.states.float() for r in records]),
        "sigmas": torch.stack([r.sigmas.float() for r in records]),
        "class_id": torch.tensor([int(r.meta.get("class_id", -1)) for r in records], dtype=torch.long),
        "guidance": torch.tensor([float(r.guidance) for r in records], dtype=torch.float32),
        "valid": torch.ones(len(records), dtype=torch.bool),
        "index": torch.tensor([r.index for r in records], dtype=torch.long),
    }
    if corpus.card.conditioning.kind == "prompt":
        batch["prompt"] = [str(r.meta.get("prompt", "")) for r in records]
    return ValidationSet(batch, used, skipped)


def _rows(batch: dict[str, Any], sl: slice) -> dict[str, Any]:
    return {k: (v[sl] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate_student(sampler: Callable[..., torch.Tensor], condition: Callable[[dict[str, Any]], tuple],
                     val: ValidationSet, num_steps: int, *, chunk: int = 128, keep_samples: int = 0) -> dict[str, Any]:
    """The student's ``num_steps``-step metrics on ``val`` (module docstring).

    sampler(x_BX, sigma_B, *cond) -> v_BX; condition(batch rows) -> cond (``Student.corpus_condition``).
    ``keep_samples`` > 0: also "samples", the student's samples of the first ``keep_samples`` trajectories, and
    "references", the teacher's stored endpoints of the same ones (the validation sample grid)."""
    states = val.batch["states"]
    K = states.shape[1]
    bounds = stage_boundary_indices(K, num_steps)
    sig = val.batch["sigmas"][0]
    boundary_sigmas = [float(sig[i]) for i in bounds]
    finals, jump_sq = [], torch.zeros(num_steps, dtype=torch.float64)
    for start in range(0, val.size, chunk):
        rows = _rows(val.batch, slice(start, start + chunk))
        cond = condition(rows)
        st = rows["states"]
        B = st.shape[0]

        def window_jump(w: int, _x, st=st, B=B, cond=cond) -> None:
            """After the walk's step w: one jump of window w from the teacher's own state at its start."""
            s0, s1 = boundary_sigmas[w], boundary_sigmas[w + 1]
            x_w = st[:, bounds[w]]
            jump = x_w + (s1 - s0) * sampler(x_w, torch.full((B,), s0), *cond).float().to(x_w.device)
            jump_sq[w] += float(((jump.double() - st[:, bounds[w + 1]].double()) ** 2).flatten(1).mean(1).sum())

        x = euler_walk(lambda x, s, cond=cond: sampler(x, s, *cond).float().to(x.device), st[:, 0], boundary_sigmas,
                       on_step=window_jump, sigma_dtype=torch.float32)
        finals.append(x)
    x_end = torch.cat(finals)
    ref = states[:, bounds[-1]]
    out = {"steps": num_steps, "coupling_error": coupling_error(x_end, ref), "swd": sliced_wasserstein(x_end, ref),
           "window_errors": [float(torch.sqrt(e / val.size)) for e in jump_sq], "num_samples": val.size}
    if keep_samples > 0:
        out["samples"], out["references"] = x_end[:keep_samples].clone(), ref[:keep_samples].clone()
    return out
