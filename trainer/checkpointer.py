"""The checkpointer: a run's checkpoints over registered stateful parts, in either format.

The parts: the student (its trainable weights, the EMA, the optimizer: checkpoint keys ``model``, ``ema``,
``optimizer``) and every auxiliary network an objective registers (``trainer.objectives.base.AuxState``;
the discriminator as ``disc``). Two writers over the same parts (torchtitan's ``CheckpointManager`` over
``Stateful`` parts, in our two formats):

- full (DDP): ``CheckpointStore.save``: safetensors weights, ``extra-<name>.safetensors`` and
  ``extra-<name>-optimizer.pt`` per part, rng and state.json, then latest.json (the commit point);
- sharded (FSDP2): every rank writes its chunks through torch.distributed.checkpoint's safetensors storage
  (``trainer.fsdp``; a part's tensors under the ``<name>.`` prefix), then the main process writes
  rng.safetensors and state.json and commits latest.json.

The run-level state (the data cursor, skipped samples, the stage, the public config) is the Trainer's and
comes in as a dict; ``resume`` loads the parts and returns (rng, state.json) for the Trainer to restore it.

Resume never takes part of a checkpoint: every file of a candidate is checked (whole safetensors, bounded
JSON, a sane step, sharded tensors covered exactly once) before anything is loaded into the live parts, and a
damaged candidate (``CheckpointCorrupt``) is skipped with a warning naming the file for the one before it
(``CheckpointStore.candidates``, newest first). Every rank walks the same candidates over the same bytes, and
the sharded loader agrees across ranks before it loads, so the ranks resume from the same step. A sound
checkpoint of another student (``CheckpointMismatch``, or a load error) is one line naming the settings that
differ. When no candidate is usable the run stops with the first one's error.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from trainer.checkpoint import (
    CheckpointCorrupt,
    CheckpointMismatch,
    CheckpointStore,
    RunLocked,
    public_config,
    redact_url,
)
from trainer.objectives.base import AuxState

#: TrainConfig fields that do not change what a checkpoint holds (ignored when explaining a mismatch)
RUN_ONLY_KEYS = {"data", "out", "max_steps", "steps_per_stage", "resume", "progress", "cache_dir", "storage_options",
                 "consumed_log", "log_every", "checkpoint_every", "num_workers", "ota_timeout", "ota_prefetch",
                 "allow_teacher_locations", "eval_every", "export", "report_to", "parallelism",
                 "fsdp_mixed_precision"}


class Checkpointer:
    """Saves and resumes a run under ``cfg.out`` (see the module docstring). Made before the student (it says
    which format and stream order the checkpoint to resume has), then ``attach``ed to the built parts."""

    def __init__(self, cfg, store: CheckpointStore | None = None):
        self.cfg = cfg
        self.store = store or CheckpointStore(cfg.out, cfg.storage_options)
        self._candidates: list[tuple[dict[str, Any], dict[str, Any]]] | None = None
        self.parts: dict[str, AuxState] = {}
        self.lock = None  # trainer.checkpoint.RunLock of the main process, from own() to release()
        self.accelerator = self.fsdp = self.student = self.model = self.optimizer = self.ema = None

    # -- before the student is built ---------------------------------------------------------------
    def candidates(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The committed checkpoints this run may resume from, newest first: ({"step", "path"}, its checked
        state.json); [] for a new run or an empty --out. Listed once (on object storage each read is a round
        trip, and an unusable latest.json would warn each time)."""
        if self._candidates is None:
            self._candidates = list(self.store.candidates()) if self.cfg.resume else []
        return self._candidates

    def resume_point(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The newest candidate (its format and stream order are the run's), None for a new run."""
        found = self.candidates()
        return found[0] if found else None

    def stream_order(self) -> str | None:
        """The sample order of the checkpoint this run resumes from (runs saved before partitioned streaming
        used the global order: their state has version 1 and no "order"), None for a new run."""
        point = self.resume_point()
        if point is None:
            return None
        return str((point[1].get("data") or {}).get("order", "global"))

    def check_format(self) -> None:
        """The checkpoint this run resumes from was written with this run's parallelism."""
        from trainer.fsdp import SHARDED_FORMAT

        point = self.resume_point()
        if point is None:
            return
        latest, st = point
        sharded = st.get("format") == SHARDED_FORMAT
        if sharded != (self.cfg.parallelism == "fsdp2"):
            written = "--parallelism fsdp2 (sharded)" if sharded else "--parallelism ddp (full weights)"
            raise ValueError(f"the checkpoint under {redact_url(self.cfg.out)} ({latest['path']}) was written by a "
                             f"{written} run; resume it with --parallelism {'fsdp2' if sharded else 'ddp'} (any number "
                             "of processes), or use a new --out / --no-resume")

    # -- the run owns --out ------------------------------------------------------------------------
    def own(self, accelerator) -> None:
        """Take the run lock on the main process (``CheckpointStore.acquire_run_lock``: checkpoints/owner.json);
        a live run that owns --out already stops every rank with one line (``RunLocked``)."""
        error = None
        if accelerator.is_main_process:
            try:
                self.lock = self.store.acquire_run_lock()
            except RunLocked as e:
                error = str(e)
        if accelerator.num_processes > 1:  # every rank stops, not only the main one
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None:
            raise RunLocked(error)

    def heartbeat(self) -> None:
        """Refresh the lock's heartbeat when due (cheap: call every step)."""
        if self.lock is not None:
            self.lock.maybe_refresh()

    def release(self) -> None:
        """Give --out up (idempotent)."""
        lock, self.lock = self.lock, None
        if lock is not None:
            lock.release()

    # -- the parts ---------------------------------------------------------------------------------
    def attach(self, *, accelerator, fsdp, student, model, optimizer, ema) -> None:
        """The student's parts (after it is built and prepared)."""
        self.accelerator, self.fsdp, self.student = accelerator, fsdp, student
        self.model, self.optimizer, self.ema = model, optimizer, ema

    def register(self, name: str, part: AuxState) -> None:
        """An auxiliary network and its optimizer, checkpointed under ``name`` (an objective's)."""
        if name in self.parts or name in ("model", "ema", "optimizer"):
            raise ValueError(f"a checkpoint part named {name!r} is already registered")
        self.parts[name] = part

    # -- save --------------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> None:
        """One checkpoint at ``step`` with the run-level ``state`` (every rank calls it)."""
        if self.lock is not None:
            self.lock.refresh()  # RunLocked if another run took --out over: stop before writing
        if self.fsdp is not None:
            return self._save_sharded(step, state)
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.store.save(step, model=self.student.trainable_state_dict(),
                            ema=None if self.ema is None else self.ema.state_dict(),
                            optimizer=self.optimizer.state_dict(), state=state,
                            net_config=self.student.net_config(),
                            extra={n: acc.unwrap_model(p.module).state_dict() for n, p in self.parts.items()},
                            extra_optimizers={n: p.optimizer.state_dict() for n, p in self.parts.items()})
        acc.wait_for_everyone()

    def _sharded_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """(tensors, optimizer scalars, each part's state dict) of a sharded checkpoint, by checkpoint key
        (``trainer.fsdp.checkpoint_tensors``): the student's trainable weights, EMA and optimizer; each part's
        weights and optimizer under ``<name>.``. The tensors are the live (sharded) storage."""
        from trainer.fsdp import checkpoint_tensors

        tensors, scalars = checkpoint_tensors(self.model, self.optimizer, self.student.trainable_state_dict(),
                                              None if self.ema is None else self.ema.state_dict())
        part_sds = {}
        for name, part in self.parts.items():
            part_sds[name] = sd = part.module.state_dict()
            t, sc = checkpoint_tensors(part.module, part.optimizer, sd, None, prefix=f"{name}.")
            tensors.update(t)
            scalars.update(sc)
        return tensors, scalars, part_sds

    def _save_sharded(self, step: int, state: dict[str, Any]) -> None:
        from trainer.fsdp import SHARDED_FORMAT, SHARDS_DIR, save_sharded

        acc = self.accelerator
        acc.wait_for_everyone()
        rel = f"checkpoints/step-{step:08d}"
        if acc.is_main_process and self.store.exists(rel):  # a step passed again after a fallback resume: a
            self.store.clear(rel)  # larger world's shard files must not stay beside this one's
        acc.wait_for_everyone()
        tensors, scalars, _ = self._sharded_tensors()
        with self.store.local_folder(f"{rel}/{SHARDS_DIR}", "w") as folder:
            save_sharded(tensors, folder)
        acc.wait_for_everyone()  # every rank's shards are written before the commit
        if acc.is_main_process:
            self.store.commit(step, rel, rng={"torch_cpu": torch.get_rng_state()}, state={
                "format": SHARDED_FORMAT, "world_size": acc.num_processes, "net_config": self.student.net_config(),
                **state, "optimizer_scalars": scalars, "extra": sorted(self.parts)})
        acc.wait_for_everyone()

    # -- resume ------------------------------------------------------------------------------------
    def resume(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], str] | None:
        """Load every part from the newest usable candidate: (its RNG state, its state.json, its path), or None
        for a new run (see the module docstring for the fallback)."""
        from trainer.fsdp import SHARDED_FORMAT

        first: CheckpointCorrupt | None = None
        for latest, st in self.candidates():
            try:
                if st.get("format") == SHARDED_FORMAT:
                    rng = self._resume_sharded(latest, st)
                else:
                    rng = self._resume_full(latest)
            except CheckpointCorrupt as e:
                first = first or e
                print(f"warning: {e}; trying the checkpoint before {latest['path']}", file=sys.stderr, flush=True)
                continue
            if first is not None:
                print(f"warning: resuming from {latest['path']}, older than the newest checkpoint (its file "
                      f"{first.path} is unusable)", file=sys.stderr, flush=True)
            return rng, st, latest["path"]
        if first is not None:
            raise first
        return None

    def misfit(self, latest: dict[str, Any], state: dict[str, Any], e: BaseException) -> ValueError:
        """The error for a checkpoint of another student than this run's, naming the settings that differ."""
        before = state.get("train_config", {})
        now = public_config(self.cfg.to_dict())  # as saved: without storage options and credentials
        diff = sorted(k for k in now if k in before and before[k] != now[k] and k not in RUN_ONLY_KEYS)
        return ValueError(f"the checkpoint under {self.cfg.out} ({latest['path']}) does not fit this run's student "
                          f"(settings that differ: {', '.join(diff) or 'none recorded'}; {' '.join(str(e).split())[:160]}); "
                          "use a new --out, or --no-resume")

    def _missing(self, part: AuxState) -> ValueError:
        return ValueError(part.missing.format(out=self.cfg.out))

    def _resume_full(self, latest: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Weights, EMA and optimizers of a DDP checkpoint (full tensors); returns its RNG state. Every file is
        read and checked before any part is loaded (``CheckpointCorrupt``: nothing changed)."""
        ck = self.store.load(latest["path"])
        try:
            self.student.load_trainable_state_dict(ck["model"])
            if self.ema is not None and ck["ema"] is not None:
                self.ema.load_state_dict(ck["ema"])
            self.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # another student than this run's
            raise self.misfit(latest, ck["state"], e) from None
        for name, part in self.parts.items():
            if name not in ck["extra"]:
                raise self._missing(part)
            self.accelerator.unwrap_model(part.module).load_state_dict(ck["extra"][name])
            osd = ck["extra_optimizers"][name]
            if part.upgrade_optimizer is not None:  # saved before the network's parameters changed
                osd = part.upgrade_optimizer(osd)
            part.optimizer.load_state_dict(osd)
        return ck["rng"]

    def _resume_sharded(self, latest: dict[str, Any], st: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Weights, EMA and optimizers of a sharded (FSDP2) checkpoint written at any world size, each rank reading
        the chunks of its own shards; returns the RNG state."""
        from trainer.fsdp import SHARDS_DIR, load_sharded, restore_optimizer

        for name, part in self.parts.items():
            if name not in st.get("extra", []):
                raise self._missing(part)
        rng = self.store.read_weights(f"{latest['path']}/rng.safetensors")  # checked before anything loads
        tensors, _, part_sds = self._sharded_tensors()
        rel = f"{latest['path']}/{SHARDS_DIR}"
        try:
            with self.store.local_folder(rel, "r") as folder:
                load_sharded(tensors, folder, world_size=st.get("world_size"), where=self.store.where(rel))
        except CheckpointCorrupt:
            raise  # damaged files: the caller falls back to an older checkpoint
        except (CheckpointMismatch, RuntimeError, ValueError, KeyError, AssertionError) as e:  # another student
            raise self.misfit(latest, st, e) from None
        scalars = st.get("optimizer_scalars", {})
        restore_optimizer(self.model, self.optimizer, tensors, scalars)
        for name, part in self.parts.items():
            part.module.load_state_dict(part_sds[name])
            restore_optimizer(part.module, part.optimizer, tensors, scalars, prefix=f"{name}.")
        return rng
