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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flowcore.metrics import coupling_error, sliced_wasserstein
from flowcore.windows import stage_boundary_indices
from storage_schemas.shard import iter_shard_samples
from trainer.data import open_corpus
from trainer.shard_cache import ShardCache

#: at most this many validation trajectories are evaluated (the split's first ones, in shard order)
MAX_VALIDATION_SAMPLES = 256


@dataclass
class ValidationSet:
    """The validation trajectories as one batch in the trainer's batch layout (``batch``: states [V, K, *X],
    sigmas [V, K], class_id [V] (-1: none), guidance [V], prompt (list, prompt corpora), valid [V])."""

    batch: dict[str, Any]
    shard_ids: list[str]

    @property
    def size(self) -> int:
        return int(self.batch["states"].shape[0])


def load_validation(url: str, storage_options: dict[str, Any] | None = None, *, cache_dir: str | None = None,
                    max_samples: int = MAX_VALIDATION_SAMPLES) -> ValidationSet | None:
    """The corpus's validation split (sha256-verified fetches through the shard cache), or None when the
    corpus has none (generated with ``--validation-trajectories 0``, or before the split existed)."""
    corpus = open_corpus(url, storage_options, split="validation")
    if not corpus.shards:
        return None
    cache = ShardCache(corpus.url, storage_options, cache_dir=cache_dir, verify_sha256=True)
    records = []
    for commit in corpus.shards:
        with open(cache.get(commit), "rb") as f:
            data = f.read()
        for rec in iter_shard_samples(data, commit.shard_id, corpus.card):
            records.append(rec)
            if len(records) >= max_samples:
                break
        if len(records) >= max_samples:
            break
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
    return ValidationSet(batch, [c.shard_id for c in corpus.shards])


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
    finals, jump_sq = [], torch.zeros(num_steps, dtype=torch.float64)
    for start in range(0, val.size, chunk):
        rows = _rows(val.batch, slice(start, start + chunk))
        cond = condition(rows)
        st = rows["states"]
        B = st.shape[0]
        x = st[:, 0]
        for w in range(num_steps):
            s0, s1 = float(sig[bounds[w]]), float(sig[bounds[w + 1]])
            sigma_B = torch.full((B,), s0)
            x = x + (s1 - s0) * sampler(x, sigma_B, *cond).float().to(x.device)
            # one jump of window w from the teacher's own state at its start
            x_w = st[:, bounds[w]]
            jump = x_w + (s1 - s0) * sampler(x_w, sigma_B, *cond).float().to(x_w.device)
            jump_sq[w] += float(((jump.double() - st[:, bounds[w + 1]].double()) ** 2).flatten(1).mean(1).sum())
        finals.append(x)
    x_end = torch.cat(finals)
    ref = states[:, bounds[-1]]
    out = {"steps": num_steps, "coupling_error": coupling_error(x_end, ref), "swd": sliced_wasserstein(x_end, ref),
           "window_errors": [float(torch.sqrt(e / val.size)) for e in jump_sq], "num_samples": val.size}
    if keep_samples > 0:
        out["samples"], out["references"] = x_end[:keep_samples].clone(), ref[:keep_samples].clone()
    return out
