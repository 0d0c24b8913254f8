"""The validation sample grid of diffusers students (issue 15, trackers): at each evaluation of a tiny SD3 student
the first validation samples (the teacher's stored endpoint | the EMA student's few-step sample) are decoded by the
pipeline's VAE, tiled, written as <out>/logs/samples/step-XXXXXXXX.png and logged as an image to TensorBoard,
Weights & Biases (offline) and MLflow (a local file store); without a VAE in the pipeline folder the grid shows
the latent channels. Flow-net students make no grid."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import allow_location, write_prompt_file
from PIL import Image

from trainer.config import TrainConfig
from trainer.loop import Trainer
from trainer.samples import latent_channel_images, sample_grid

#: 4 validation trajectories (one shard): the grid holds all of them
N_VAL = 4


def _corpus(pipeline_dir: str, root: Path) -> str:
    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process

    prompts = write_prompt_file(root / "prompts.jsonl")
    return generate_in_process(GenerateConfig(
        teacher=f"diffusers:{pipeline_dir}", out=str(root / "corpus"), num_trajectories=8 + N_VAL, shard_size=4,
        batch_size=4, num_steps=8, stages=(4,), guidance=2.0, prompts=str(prompts), resolution=16, progress=False,
        validation_trajectories=N_VAL))


def _train(data: str, out: Path, report_to: str, max_steps: int = 2) -> None:
    cfg = TrainConfig(data=data, out=str(out), stages=(4,), batch_size=4, max_steps=max_steps, eval_every=1,
                      num_workers=0, progress=False, log_every=1, report_to=report_to)
    t = Trainer(cfg).build()
    try:
        t.train()
    finally:
        t.close()


def _grid(path: Path) -> np.ndarray:
    assert path.exists(), sorted(p.name for p in path.parent.glob("*"))
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
def test_sd3_grid_png_and_every_tracker(sd3_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    have = {name: __import__("importlib").util.find_spec(name) is not None for name in ("tensorboard", "wandb", "mlflow")}
    trackers = [n for n, ok in have.items() if ok]
    data = _corpus(sd3_dir, tmp_path)
    out = tmp_path / "run"
    _train(data, out, ",".join(trackers) or "none")

    # one PNG per evaluation: 4 rows of [teacher | student], 16 px images scaled up 4x to 64 px, 2 px gaps
    grids = {s: _grid(out / "logs" / "samples" / f"step-{s:08d}.png") for s in (1, 2)}
    for g in grids.values():
        assert g.shape == (N_VAL * 66 + 2, 2 * 66 + 2, 3)
    # the left column is the stock VAE decode of the teacher's stored endpoints (SD3: z / scaling + shift)
    from diffusers import AutoencoderKL

    from trainer.validation import load_validation

    val = load_validation(data)
    vae = AutoencoderKL.from_pretrained(sd3_dir, subfolder="vae", local_files_only=True)
    with torch.no_grad():
        z = val.batch["states"][:N_VAL, -1]
        ref = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    ref = ((ref / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy()
    for i in range(N_VAL):
        y = 2 + i * 66
        left = grids[2][y:y + 64:4, 2:66:4].astype(float)  # nearest upscaling by 4: every 4th pixel is the image
        assert np.abs(left - ref[i]).max() <= 1, i
    # the right column is the student's sample: not the teacher's, and not blank
    right = grids[2][2:66:4, 68:132:4].astype(float)
    assert right.std() > 1 and np.abs(right - ref[0]).mean() > 0

    if have["tensorboard"]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        # the run's writer (accelerate's TensorBoard tracker: logs/<project>; hparams go to a subfolder)
        acc = EventAccumulator(str(out / "logs" / "trajflow"), size_guidance={"images": 0})
        acc.Reload()
        assert "val_samples" in acc.Tags()["images"]
        shots = acc.Images("val_samples")
        assert [s.step for s in shots] == [1, 2]
        assert (shots[0].height, shots[0].width) == grids[1].shape[:2]
    if have["wandb"]:  # the offline run keeps the logged image among its media files
        media = list((out / "logs" / "wandb").glob("offline-run-*/files/media/images/val_samples_*.png"))
        assert len(media) == 2, media
    if have["mlflow"]:
        import mlflow

        client = mlflow.tracking.MlflowClient()
        (exp,) = client.search_experiments(filter_string="name = 'trajflow'")
        (run,) = client.search_runs([exp.experiment_id])
        names = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        assert sum(n.endswith(".png") and "val_samples" in n for n in names) == 2, names
    if not all(have.values()):
        pytest.skip(f"not installed, so not checked: {[n for n, ok in have.items() if not ok]} (the PNG was)")


@pytest.mark.slow
def test_without_a_vae_the_grid_shows_latent_channels(sd3_dir, tmp_path, capfd):
    folder = tmp_path / "sd3-no-vae"
    shutil.copytree(sd3_dir, folder)
    for f in (folder / "vae").glob("*.safetensors"):  # vae/config.json stays: generation reads the latent scale
        f.unlink()
    allow_location(folder)
    data = _corpus(str(folder), tmp_path)
    out = tmp_path / "run"
    _train(data, out, "none", max_steps=1)
    assert "the validation sample grids show the latent channels" in capfd.readouterr().err
    g = _grid(out / "logs" / "samples" / "step-00000001.png")
    # 4 latent channels of 8 x 8, each scaled up 8x to 64 px with 1 px gaps: a 64 x 259 strip per image
    assert g.shape == (N_VAL * 66 + 2, 2 * (259 + 2) + 2, 3)
    from trainer.validation import load_validation

    z = load_validation(data).batch["states"][0, -1]  # the teacher's endpoint, channel 0, row 0 of the grid
    want = ((z[0] / 3 + 1) / 2).clamp(0, 1) * 255
    assert np.abs(g[2:66:8, 2:66:8, 0].astype(float) - want.numpy()).max() <= 1


def test_grid_layout_units():
    ref, stu = torch.zeros(3, 3, 16, 16), torch.ones(3, 3, 16, 16)
    g = sample_grid(ref, stu)
    assert g.shape == (3 * 66 + 2, 134, 3) and g.dtype == np.uint8
    assert (g[2:66, 2:66] == 0).all() and (g[2:66, 68:132] == 255).all() and (g[0:2] == 255).all()
    big = sample_grid(torch.rand(1, 3, 1024, 1024), torch.rand(1, 3, 1024, 1024))  # SD3-sized: 256 px tiles
    assert big.shape == (260, 518, 3)
    strips = latent_channel_images(torch.randn(2, 16, 128, 128))  # SD3 latents: 16 tiles of 64 px
    assert strips.shape == (2, 3, 64, 16 * 64 + 15)
    assert latent_channel_images(torch.full((1, 1, 8, 8), 9.0)).max() == 1  # clipped at +3


def test_flow_net_students_make_no_grid(tmp_path):
    from fixtures import make_gmm_corpus as make_corpus

    data = make_corpus(str(tmp_path / "corpus"), 96, 32, stages=(8, 4), validation=32)
    out = tmp_path / "run"
    cfg = TrainConfig(data=data, out=str(out), stages=(4,), init="scratch", student_width=16, student_depth=1,
                      batch_size=16, max_steps=1, num_workers=0, progress=False, eval_every=1)
    t = Trainer(cfg).build()
    try:
        t.train()
    finally:
        t.close()
    assert '"eval": true' in (out / "logs" / "metrics.jsonl").read_text()  # it evaluated, and made no grid
    assert not (out / "logs" / "samples").exists()
