"""`trajflow generate --prompts` with a teacher that cannot encode prompts fails at worker start-up,
with the reason, before any shard is solved or written."""

from __future__ import annotations

import os
import shutil

import pytest
from fixtures import write_prompt_file

from pipeline.worker import GenerationWorker
from trajflow.cli import main


@pytest.fixture(scope="module")
def no_tokenizer_sd15(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    full = str(root / "tiny-sd15")
    assert main(["make-tiny-sd15", full]) == 0
    notok = str(root / "no-tokenizer")
    shutil.copytree(full, notok, ignore=shutil.ignore_patterns("tokenizer"))
    return notok


def _prompts(tmp_path):
    return str(write_prompt_file(tmp_path / "prompts.jsonl", ["a cat", "a dog"]))


def test_worker_refuses_at_start_up(no_tokenizer_sd15, tmp_path):
    cfg = dict(teacher=f"diffusers:{no_tokenizer_sd15}", out=str(tmp_path / "c"), num_trajectories=4, shard_size=4,
               batch_size=4, num_steps=4, stages=(2,), guidance=2.0, prompts=_prompts(tmp_path), resolution=16)
    with pytest.raises(ValueError, match=r"--prompts given, but teacher .* cannot encode them: .*no tokenizer/"):
        GenerationWorker(cfg, device="cpu")


def test_generate_fails_before_any_shard(no_tokenizer_sd15, tmp_path, ray_cluster, capsys):
    out = tmp_path / "corpus"
    rc = main(["generate", "--teacher", f"diffusers:{no_tokenizer_sd15}", "--prompts", _prompts(tmp_path),
               "--resolution", "16", "--num-trajectories", "8", "--shard-size", "4", "--batch-size", "4",
               "--num-steps", "4", "--stages", "2", "--guidance", "2.0", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    line = next(ln for ln in err.splitlines() if ln.startswith("trajflow generate: error:"))
    # the reason itself, not Ray's remote traceback
    assert "could not start teacher" in line and "ValueError: --prompts given" in line and "no tokenizer/" in line
    # nothing was committed: no card, no shards
    assert not os.path.exists(out / "dataset.json")
    assert not any(n.endswith(".tar") for _, _, files in os.walk(out) for n in files) if out.exists() else True
