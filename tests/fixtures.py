"""Shared test helpers (imported by conftest.py and the test modules): the tiny prompt set, one prompt-file
writer, the tiny pipeline builders by kind, and the arguments of a tiny prompt corpus."""

from __future__ import annotations

import json
from pathlib import Path

#: the prompts of every tiny prompt corpus
PROMPTS = ["a red cat", "a blue dog on grass", "sunset 42", "two green birds"]

#: tiny pipeline kind -> (make-tiny CLI subcommand, stock diffusers pipeline class name)
TINY_KINDS = {"sd3": "StableDiffusion3Pipeline", "sd15": "StableDiffusionPipeline",
              "sdxl": "StableDiffusionXLPipeline"}

#: data-determining flags of the tiny prompt corpora (8 trajectories in 2 shards, 16 px, 8 solver steps)
PROMPT_CORPUS_FLAGS = {"resolution": 16, "num_trajectories": 8, "shard_size": 4, "batch_size": 4, "num_steps": 8,
                       "stages": "4", "guidance": 2.0}


def write_prompt_file(path: str | Path, prompts=PROMPTS) -> Path:
    """A prompts.jsonl file (one {"prompt_id", "prompt"} object per line) at ``path``."""
    path = Path(path)
    path.write_text("".join(json.dumps({"prompt_id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    allow_location(path)  # corpus cards name their prompt file (OTA and eval read it)
    return path


def make_tiny_pipeline(kind: str, folder: str | Path) -> str:
    """A tiny random-weight pipeline folder of ``kind`` (sd3, sd15, sdxl), built through the CLI command users run."""
    from trajflow.cli import main

    assert kind in TINY_KINDS, kind
    assert main([f"make-tiny-{kind}", str(folder)]) == 0
    allow_location(folder)
    return str(folder)


def allow_location(prefix: str | Path) -> None:
    """Name ``prefix`` as a trusted teacher location for this test session (``TRAJFLOW_ALLOW_TEACHER_LOCATIONS``,
    inherited by subprocesses), as a user does with ``--allow-teacher-location``: corpus cards of the tiny
    pipelines name their folder, which lies outside every corpus root."""
    import os

    from storage_schemas.locations import ALLOW_ENV

    entries = [e for e in os.environ.get(ALLOW_ENV, "").split(os.pathsep) if e]
    os.environ[ALLOW_ENV] = os.pathsep.join(dict.fromkeys([*entries, str(prefix)]))


def generate_args(teacher_dir: str, prompts: str | Path, out: str, **flags) -> list[str]:
    """`trajflow generate` arguments of a tiny prompt corpus (``PROMPT_CORPUS_FLAGS`` overridden by ``flags``)."""
    args = ["generate", "--teacher", f"diffusers:{teacher_dir}", "--prompts", str(prompts), "--out", out,
            "--no-progress"]
    for k, v in {**PROMPT_CORPUS_FLAGS, **flags}.items():
        if v is not None:
            args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def make_gmm_corpus(out: str, n: int, shard_size: int, *, guidance=2.0, stages=(8, 4), num_steps=16,
                    validation: int = 0) -> str:
    """A real latent10 (GMM) corpus written by the generation worker and committer (no Ray needed);
    ``validation``: its validation split in trajectories (0: every shard trains)."""
    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process

    return generate_in_process(GenerateConfig(teacher="gmm:latent10", out=out, num_trajectories=n,
                                              shard_size=shard_size, num_steps=num_steps, stages=stages,
                                              guidance=guidance, progress=False,
                                              validation_trajectories=validation))
