"""FSDP2 (`train --parallelism fsdp2`) of a tiny SD3 student and its discriminator, in real `accelerate launch`
processes (2 gloo processes on CPU) and in this process (1 rank): the loss of 20 steps matches DDP's, a run
"killed" after a sharded checkpoint resumes bit-exactly (full fine-tune and LoRA, both with --adv-weight; the LoRA
run's discriminator trunk stops before the transformer's last block), the checkpoint loads exactly on 1 process
and that process completes the epoch with every sample once; the sharded checkpoint is safetensors + JSON only;
bad flags are one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import write_prompt_file
from safetensors import safe_open

BIN = Path(sys.executable).parent
#: 32 trajectories in shards of 8, the last shard the validation split: 24 training trajectories, so a
#: global batch of 8 (2 ranks x 4) makes 3 steps an epoch and the checkpoint at step 2 lies inside it
N_TRAIN = 24


@pytest.fixture(scope="module")
def corpus(sd3_dir, tmp_path_factory):
    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process

    root = tmp_path_factory.mktemp("fsdp-corpus")
    prompts = write_prompt_file(root / "prompts.jsonl")
    return generate_in_process(GenerateConfig(
        teacher=f"diffusers:{sd3_dir}", out=str(root / "corpus"), num_trajectories=N_TRAIN + 8, shard_size=8,
        batch_size=8, num_steps=8, stages=(4,), guidance=2.0, prompts=str(prompts), resolution=16, progress=False,
        validation_trajectories=8))


def _args(corpus, out, max_steps, *flags) -> list[str]:
    """--prompt-cache-size 0: every step encodes its own prompts, so a resumed run embeds them bit-exactly as the
    uninterrupted one (see test_adversarial_diffusers)."""
    return ["train", "--data", corpus, "--out", str(out), "--stages", "4", "--batch-size", "4", "--max-steps",
            str(max_steps), "--num-workers", "0", "--no-progress", "--log-every", "1", "--checkpoint-every", "2",
            "--prompt-cache-size", "0", "--eval-every", "2", *flags]


def _launch(corpus, out, max_steps, *flags) -> None:
    """`accelerate launch` 2 gloo processes of `trajflow train` (as users run it)."""
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trajflow", *_args(corpus, out, max_steps, *flags)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]


def _losses(run) -> list[dict]:
    return [json.loads(line) for line in Path(run, "logs", "metrics.jsonl").read_text().splitlines()
            if '"eval"' not in line]


def read_sharded(folder: Path) -> dict[str, torch.Tensor]:
    """The full tensors of a sharded checkpoint, assembled from its safetensors shards by the chunk offsets in
    their headers (no torch.distributed.checkpoint: the format is plain safetensors + JSON)."""
    chunks: dict[str, list] = {}
    for f in sorted(folder.iterdir()):
        assert f.suffix == ".safetensors", f  # nothing else: no pickled .metadata
        with safe_open(str(f), framework="pt") as st:
            offsets = json.loads(st.metadata()["DCP_SHARDING_INFO"])
            for k in st.keys():
                chunks.setdefault(k, []).append((offsets[k]["saved_offsets"], st.get_tensor(k)))
    out = {}
    for k, parts in chunks.items():
        shape = [max(o[d] + t.shape[d] for o, t in parts) for d in range(parts[0][1].ndim)]
        full = torch.full(shape, float("nan"), dtype=parts[0][1].dtype)
        for o, t in parts:
            full[tuple(slice(a, a + n) for a, n in zip(o, t.shape))] = t
        assert not full.isnan().any(), k  # the chunks cover the tensor
        out[k] = full
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{what}: {k}")


def _consumed(folder: Path) -> list[int]:
    return [i for f in sorted(folder.glob("rank-*.jsonl")) for line in f.read_text().splitlines()
            for i in json.loads(line)["indices"]]


def _resume_in_this_process(corpus, run, max_steps, consumed, *, adv: bool, lora: int | None, disc_blocks: int = 2):
    """A 1-process FSDP2 Trainer (its own 1-rank gloo group) that resumes ``run``'s latest sharded checkpoint;
    checks that the weights, EMA, optimizer state and the discriminator are exactly the checkpoint's, then trains
    on to ``max_steps`` and exports."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from trainer.config import TrainConfig
    from trainer.loop import Trainer

    latest = json.loads(Path(run, "checkpoints", "latest.json").read_text())
    saved = read_sharded(Path(run, latest["path"], "sharded"))
    cfg = TrainConfig(data=corpus, out=str(run), stages=(4,), batch_size=4, max_steps=max_steps, num_workers=0,
                      progress=False, log_every=1, checkpoint_every=2, prompt_cache_size=0, eval_every=2,
                      parallelism="fsdp2", adv_weight=0.1 if adv else 0.0, lora_rank=lora, consumed_log=str(consumed),
                      disc_blocks=disc_blocks)
    trainer = Trainer(cfg).build()
    try:
        assert trainer.world == 1 and trainer.step == latest["step"]
        full = {k: v.full_tensor() for k, v in trainer.student.trainable_state_dict().items()}
        _assert_same(full, {k[6:]: v for k, v in saved.items() if k.startswith("model.")}, "weights")
        ema = {k: v.full_tensor() for k, v in trainer.ema.state_dict().items()}
        _assert_same(ema, {k[4:]: v for k, v in saved.items() if k.startswith("ema.")}, "EMA")
        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        for prefix, model, opt in [("", trainer.model, trainer.optimizer)] + (
                [("disc.", trainer.part("adversarial").disc, trainer.part("adversarial").disc_optimizer)] if adv else []):
            osd = get_optimizer_state_dict(model, opt, options=opts)
            got = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in osd.items()
                   if isinstance(v, torch.Tensor)}
            want = {k[len(prefix) + 10:]: v for k, v in saved.items() if k.startswith(f"{prefix}optimizer.")}
            assert got and any(k.endswith("exp_avg_sq") for k in got)
            _assert_same(got, want, f"{prefix}optimizer")
        if adv:
            disc = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in trainer.part("adversarial").disc.state_dict().items()}
            _assert_same(disc, {k[11:]: v for k, v in saved.items() if k.startswith("disc.model.")}, "discriminator")
        trainer.train()
        trainer.export_student()
    finally:
        trainer.close()
    import torch.distributed as dist

    assert not dist.is_initialized()  # the 1-rank group is the trainer's own and closes with it


@pytest.mark.slow
@pytest.mark.parametrize("lora", [None, 2], ids=["full", "lora"])
def test_fsdp2_with_discriminator_resumes_exactly_also_on_one_process(corpus, tmp_path, lora):
    # LoRA: also a discriminator whose trunk (1 block) stops before the 2-block transformer's context_pre_only last
    # block; its last trunk block keeps no text-stream output modules, so every parameter has optimizer state
    disc_blocks = 1 if lora else 2
    flags = ["--parallelism", "fsdp2", "--adv-weight", "0.1", "--disc-blocks", str(disc_blocks)] + (
        ["--lora-rank", str(lora)] if lora else [])
    a, b = tmp_path / "a", tmp_path / "b"
    _launch(corpus, a, 4, *flags)
    _launch(corpus, b, 2, *flags, "--consumed-log", str(tmp_path / "consumed-2"))
    shutil.copytree(b, tmp_path / "c")
    _launch(corpus, b, 4, *flags)  # "killed" after step 2, resumed with 2 processes
    step4 = "checkpoints/step-00000004/sharded"
    files = sorted(p.name for p in Path(a, step4).iterdir())
    assert files == ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    ta, tb = read_sharded(Path(a, step4)), read_sharded(Path(b, step4))
    groups = {k.split(".")[0] for k in ta}
    assert groups == {"model", "ema", "optimizer", "disc"}, groups
    if disc_blocks == 1:  # the trunk's last block: no text-stream output modules, in weights or optimizer state
        assert not [k for k in ta if k.startswith("disc.") and (".to_add_out." in k or ".ff_context." in k)]
    if lora:  # only the adapters train, and only they are saved
        assert all("lora" in k for k in ta if k.startswith("model."))
    _assert_same(ta, tb, "step 4")
    sa, sb = (json.loads(Path(r, "checkpoints/step-00000004/state.json").read_text()) for r in (a, b))
    assert sa["format"] == "trajflow-fsdp2-dcp/1" and sa["world_size"] == 2
    assert sa["optimizer_scalars"] == sb["optimizer_scalars"] and sa["data"] == sb["data"]
    assert [r["loss"] for r in _losses(a)] == [r["loss"] for r in _losses(b)][-4:]
    assert (a / "student" / ("pytorch_lora_weights.safetensors" if lora else "transformer")).exists()

    # the step-2 checkpoint of 2 processes on 1 process: state exactly the checkpoint's; steps 3-4 finish the epoch
    c = tmp_path / "c"
    _resume_in_this_process(corpus, c, 4, tmp_path / "consumed-1", adv=True, lora=lora, disc_blocks=disc_blocks)
    first, rest = _consumed(tmp_path / "consumed-2"), _consumed(tmp_path / "consumed-1")
    assert len(first) == 16 and len(rest) == 8
    assert len(set(first + rest)) == N_TRAIN  # every training sample of epoch 0 once, across the world sizes
    assert json.loads(Path(c, "checkpoints/step-00000004/state.json").read_text())["world_size"] == 1
    assert (c / "student" / "trajflow_student.json").exists()


@pytest.mark.slow
def test_fsdp2_loss_matches_ddp_over_20_steps_and_bf16_policy_trains(corpus, tmp_path):
    common = ["--eval-every", "0", "--checkpoint-every", "20"]
    _launch(corpus, tmp_path / "ddp", 20, *common)
    _launch(corpus, tmp_path / "fsdp", 20, *common, "--parallelism", "fsdp2")
    ddp, fsdp = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp] == list(range(1, 21))
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in fsdp]), torch.tensor([r[key] for r in ddp]),
                                   rtol=1e-4, atol=1e-6, msg=key)
    # the same weights at the end: the sharded checkpoint's vs the DDP checkpoint's (full tensors)
    from safetensors.torch import load_file

    full = load_file(tmp_path / "ddp" / "checkpoints/step-00000020/model.safetensors")
    sharded = read_sharded(tmp_path / "fsdp" / "checkpoints/step-00000020/sharded")
    for k, v in full.items():
        torch.testing.assert_close(sharded[f"model.{k}"], v, rtol=1e-4, atol=1e-5, msg=k)
    # bf16 parameters in forward/backward with fp32 reduction: trains, master weights and optimizer stay fp32
    _launch(corpus, tmp_path / "bf16", 2, "--eval-every", "0", "--parallelism", "fsdp2", "--fsdp-mixed-precision", "bf16")
    rows = _losses(tmp_path / "bf16")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    saved = read_sharded(tmp_path / "bf16" / "checkpoints/step-00000002/sharded")
    assert {v.dtype for k, v in saved.items() if not k.endswith(".step")} == {torch.float32}


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "warn" not in ln.lower() and not ln.startswith("note: ")]
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def test_bad_fsdp_settings_are_clear_one_line_errors(corpus, tmp_path):
    from trainer.config import TrainConfig, fsdp_precision_dtypes

    assert fsdp_precision_dtypes("bf16") == ("bf16", "fp32")
    assert fsdp_precision_dtypes("param=bf16,reduce=bf16") == ("bf16", "bf16")
    for bad, match in [({"parallelism": "zero3"}, "parallelism 'zero3': choose ddp or fsdp2"),
                       ({"parallelism": "fsdp2", "fsdp_mixed_precision": "fp8"}, "fsdp-mixed-precision 'fp8'"),
                       ({"parallelism": "fsdp2", "fsdp_mixed_precision": "param=bf16"}, "param=DTYPE,reduce=DTYPE"),
                       ({"fsdp_mixed_precision": "bf16"}, "needs --parallelism fsdp2"),
                       ({"parallelism": "fsdp2", "mixed_precision": "fp16"}, "not supported with --parallelism fsdp2")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(data="d", out="o", **bad)
    from trainer.loop import Trainer

    # the unrolled objective is the flow-net students' (a diffusers student's k-step solve holds k forwards)
    with pytest.raises(ValueError, match="--objective unrolled .* is for flow-net students; diffusers"):
        Trainer(TrainConfig(data=corpus, out=str(tmp_path / "u"), objective="unrolled", stages=(4,))).build()
    trajflow = str(BIN / "trajflow")
    r = subprocess.run([trajflow, "train", "--data", corpus, "--out", str(tmp_path / "x"), "--parallelism", "fsdp2",
                        "--fsdp-mixed-precision", "fp8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "fsdp-mixed-precision 'fp8'" in _one_line_error(r)
    # a flow-net student refuses fsdp2 before anything is built
    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process

    gmm = generate_in_process(GenerateConfig(teacher="gmm:latent10", out=str(tmp_path / "gmm"), num_trajectories=32,
                                             shard_size=32, num_steps=8, stages=(4,), progress=False,
                                             validation_trajectories=0))
    r = subprocess.run([trajflow, "train", "--data", gmm, "--out", str(tmp_path / "g"), "--stages", "4", "--max-steps",
                        "1", "--parallelism", "fsdp2", "--no-progress"], capture_output=True, text=True, timeout=300)
    line = _one_line_error(r)
    assert "--parallelism fsdp2" in line and "flow-net students train with DDP" in line, line
    # a DDP checkpoint is not resumed by an fsdp2 run (nor the other way round): one line naming the flag
    from trajflow.cli import main

    run = str(tmp_path / "ddp-run")
    assert main(_args(corpus, run, 1, "--eval-every", "0")) == 0
    r = subprocess.run([trajflow, *_args(corpus, run, 2, "--eval-every", "0", "--parallelism", "fsdp2")],
                       capture_output=True, text=True, timeout=300)
    line = _one_line_error(r)
    assert "written by a --parallelism ddp (full weights) run; resume it with --parallelism ddp" in line, line
