"""Pickled diffusers weights are refused with one line (issue 16): a pipeline folder whose transformer
weights are a torch pickle instead of safetensors is never unpickled by generate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from fixtures import write_prompt_file
from safetensors.torch import load_file

TRAJFLOW = str(Path(sys.executable).parent / "trajflow")


def test_generate_refuses_pickled_diffusers_weights_in_one_line(sd3_dir, tmp_path):
    folder = tmp_path / "pickled-sd3"
    shutil.copytree(sd3_dir, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    marker = tmp_path / "unpickled"

    class Payload:  # executes on unpickling: the file must never be unpickled
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": load_file(weights), "payload": Payload()}, folder / "transformer" / "diffusion_pytorch_model.bin")
    weights.unlink()
    prompts = write_prompt_file(tmp_path / "prompts.jsonl")
    r = subprocess.run([TRAJFLOW, "generate", "--teacher", f"diffusers:{folder}", "--prompts", str(prompts),
                        "--resolution", "16", "--num-trajectories", "4", "--shard-size", "4", "--num-steps", "4",
                        "--stages", "2", "--out", str(tmp_path / "corpus"), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and not marker.exists()
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("trajflow generate: error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
