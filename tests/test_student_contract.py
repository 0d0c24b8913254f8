"""The ``Student`` contract (``trainer.students.base``), parametrised over the family registry (``FAMILIES``): a flow
net on a GMM corpus, an SD3 transformer and an SD1.5 UNet on tiny prompt corpora (the tiny pipelines of
``conftest.py``, generated in process). Every family must declare the interface, keep one condition arity across
corpus, online and adversarial rows, round-trip its trainable weights, keep EMA storage under the trainable names,
export a folder that the readers (``trajflow sample``'s loader, ``trajflow eval``'s) load back to the same network,
and refuse what it does not support, by capability. A new family is one more entry of ``CASES``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import pytest
import torch
from fixtures import make_gmm_corpus, write_prompt_file

from flowcore.windows import sample_windows
from storage_schemas import DatasetCard
from trainer.config import OBJECTIVES, TrainConfig
from trainer.students import (
    FAMILIES,
    STUDENTS_BY_TEACHER_KIND,
    FlowNetStudent,
    SD3Student,
    StudentBase,
    UNetStudent,
    check_run,
    folder_kind_of,
    student_class_for,
)
from trainer.students.base import CAPABILITIES, UNROLLED_REFUSAL, cat_conditions, select_condition
from trainer.students.folder import STUDENT_META, read_student_meta

STAGE = 2


def _reload_flownet(folder: str, student) -> torch.nn.Module:
    """``trajflow eval``'s loader of an exported flow-net student."""
    from trajflow.evaluation import load_student

    net, extra = load_student(folder)
    assert extra["num_inference_steps"] == STAGE and extra["card"]["teacher"] == student.card.teacher.to_dict()
    return net


def _reload_diffusers(folder: str, student) -> torch.nn.Module:
    """``trajflow sample``'s loader: the stock pipeline with the student's network (or LoRA) and scheduler; the
    loaded denoiser wrapped in the family's forward (sigma -> the network's timestep or VP conversion)."""
    from trajflow.sample import load_student_pipeline

    base = student.card.teacher.config["source"]["path"]
    pipe, meta = load_student_pipeline(folder, device="cpu", allow=(base,))
    layout = type(student).folder_kind
    assert folder_kind_of(meta) is layout
    assert type(pipe).__name__ == meta["pipeline_class"] and meta["pipeline_class"] in layout.pipeline_classes
    assert type(pipe.scheduler).__name__ == layout.scheduler_class
    denoiser = getattr(pipe, layout.subfolder)
    if isinstance(student, SD3Student):
        from trainer.students.sd3 import SD3StudentNet

        return SD3StudentNet(denoiser, num_train_timesteps=student.network.num_train_timesteps)
    from trainer.students.unet import UNetStudentNet

    return UNetStudentNet(denoiser, student.network.conversion)


#: family -> (tiny pipeline kind or None for a GMM corpus, build settings, reloader of its export)
CASES: dict[type, tuple[str | None, dict[str, Any], Any]] = {
    FlowNetStudent: (None, {"init": "teacher", "student_width": 16, "student_depth": 1}, _reload_flownet),
    SD3Student: ("sd3", {"lora_rank": 2, "adv_weight": 0.1, "disc_blocks": 1}, _reload_diffusers),
    UNetStudent: ("sd15", {}, _reload_diffusers),
}

#: capability -> settings that need it (``check_run`` refuses them for a family without it)
NEEDS = {
    "ota:fresh": {"ota_ratio": 0.5, "ota_mode": "fresh"},
    "ota:student": {"ota_ratio": 0.5, "ota_mode": "student"},
    "ota:perflow": {"ota_ratio": 0.5, "ota_mode": "perflow"},
    "ota:online_only": {"ota_ratio": 1.0, "ota_mode": "fresh"},
    "adversarial": {"adv_weight": 0.1},
    "fsdp2": {"parallelism": "fsdp2"},
    "objective:unrolled": {"objective": "unrolled"},
}


def test_every_family_has_a_case_and_every_capability_a_setting():
    assert set(CASES) == set(FAMILIES)
    assert set(NEEDS) == set(CAPABILITIES)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.kind)
def test_family_declares_the_interface(family):
    assert issubclass(family, StudentBase)
    assert isinstance(family.kind, str) and family.kind and isinstance(family.display_name, str)
    assert family.teacher_kinds and all(student_class_for(k) is family for k in family.teacher_kinds)
    assert family.capabilities <= set(CAPABILITIES)
    assert isinstance(family.DEFAULT_BUDGET, int) and family.DEFAULT_BUDGET > 0
    assert isinstance(family.DEFAULT_BATCH_SIZE, int) and family.DEFAULT_BATCH_SIZE > 0
    assert family.DEFAULT_MIXED_PRECISION_ON_BF16_GPU in ("no", "bf16", "fp16")
    assert isinstance(family.export_entry, str)
    assert family.folder_kind is None or family.folder_kind.kind == family.kind
    for name in ("build", "check_corpus"):  # class-level entry points, called before any student exists
        assert callable(getattr(family, name))


def test_unknown_teacher_kind_is_an_error():
    with pytest.raises(ValueError, match="'flux' teacher corpus is not supported by this trainer"):
        student_class_for("flux")
    assert set(STUDENTS_BY_TEACHER_KIND) == {k for f in FAMILIES for k in f.teacher_kinds}
    with pytest.raises(ValueError, match="unknown student kind 'flux'"):
        folder_kind_of({"kind": "flux"})
    assert folder_kind_of({}) is SD3Student.folder_kind  # folders exported before kinds existed


# --------------------------------------------------------------------------------------------------- built students
@dataclasses.dataclass
class Built:
    family: type
    url: str
    card: DatasetCard
    cfg: TrainConfig
    student: Any
    batch: dict[str, Any]


def _corpus(tmp, pipeline_dir: str | None) -> str:
    if pipeline_dir is None:
        return make_gmm_corpus(str(tmp / "gmm"), 32, 32, stages=(STAGE,), num_steps=4)
    from pipeline.config import GenerateConfig
    from pipeline.driver import generate_in_process

    prompts = write_prompt_file(tmp / "prompts.jsonl")
    return generate_in_process(GenerateConfig(teacher=f"diffusers:{pipeline_dir}", out=str(tmp / "corpus"),
                                              prompts=str(prompts), resolution=16, num_trajectories=4, shard_size=4,
                                              batch_size=4, num_steps=4, stages=(STAGE,), guidance=2.0,
                                              progress=False))


@pytest.fixture(scope="module", params=list(CASES), ids=lambda f: f.kind)
def built(request, tmp_path_factory) -> Built:
    from trainer.data import CorpusStream, StreamConfig, open_corpus

    family = request.param
    pipeline, settings, _ = CASES[family]
    tmp = tmp_path_factory.mktemp(f"contract-{family.kind}")
    pipeline_dir = None if pipeline is None else request.getfixturevalue("tiny_pipeline_dir")(pipeline)
    url = _corpus(tmp, pipeline_dir)
    card = open_corpus(url).card
    assert student_class_for(card) is family
    allow = () if pipeline_dir is None else (pipeline_dir,)  # the card names the tiny pipeline, outside the corpus
    cfg = TrainConfig(data=url, out=str(tmp / "run"), stages=(STAGE,), gradient_checkpointing=False,
                      allow_teacher_locations=allow, **settings)
    torch.manual_seed(0)
    student = family.build(card, cfg, device="cpu")
    stream = CorpusStream(StreamConfig(url=url, batch_size=4, cache_dir=str(tmp / "cache")), 0, 1, batched=True)
    try:
        batch = next(iter(stream))
    finally:
        stream.close()
    return Built(family, url, card, cfg, student, batch)


def _rows(b: Built, seed: int):
    """One window point per corpus trajectory (``flowcore.windows``, as the windows objective draws them)."""
    return sample_windows(b.batch["states"].float(), b.batch["sigmas"][0], STAGE,
                          generator=torch.Generator().manual_seed(seed))


def _online(b: Built):
    """An ``OTABatch`` of online windows for the batch's trajectories (class / guidance / prompts as a rollout's)."""
    from trainer.ota import OTABatch

    prompts = list(b.batch["prompt"]) if b.card.conditioning.kind == "prompt" else None
    class_B = b.batch["class_id"] if b.card.conditioning.kind == "class" else None
    return OTABatch(_rows(b, 1), class_B, b.batch["guidance"], prompts=prompts)


def test_condition_arity_across_corpus_online_and_adversarial_rows(built):
    b, student = built, built.student
    corpus_w, online = _rows(b, 0), _online(b)
    cond = student.corpus_condition(b.batch)
    ocond = student.online_condition(online)
    assert isinstance(cond, tuple) and len(cond) == len(ocond) > 0
    for c, o in zip(cond, ocond):  # position-wise: both absent, or tensors of the same row shape
        assert (c is None) == (o is None)
        if c is not None:
            assert c.shape[1:] == o.shape[1:] and c.shape[0] == o.shape[0] == len(b.batch["valid"])
    # one forward serves every part of a step: the concatenated rows give each part's own velocities
    x = torch.cat([corpus_w.x_BX, online.windows.x_BX])
    sigma = torch.cat([corpus_w.sigma_B, online.windows.sigma_B])
    with torch.no_grad():
        v = student.network(x, sigma, *cat_conditions([cond, ocond]))
        v_corpus = student.network(corpus_w.x_BX, corpus_w.sigma_B, *cond)
    assert v.shape == x.shape and bool(torch.isfinite(v).all())
    torch.testing.assert_close(v[: len(v_corpus)], v_corpus, rtol=1e-4, atol=1e-5)
    fn = student.sampler(contextlib.nullcontext, torch.device("cpu"))
    assert fn(x, sigma, *cat_conditions([cond, ocond])).shape == x.shape
    # the adversarial part: the discriminator's arguments for a subset of the corpus rows
    if "adversarial" not in b.family.capabilities:
        with pytest.raises(ValueError):
            student.build_discriminator(b.cfg)
        return
    disc = student.build_discriminator(dataclasses.replace(b.cfg, adv_weight=0.1, disc_blocks=1))
    keep = torch.tensor([True, False, True, True])
    rows = select_condition(cond, keep)
    dcond = student.discriminator_condition(rows)
    with torch.no_grad():
        logit, feats = disc(corpus_w.x_BX[keep], corpus_w.sigma_B[keep], *dcond)
    assert logit.shape == (3,) and len(feats) == 1 and bool(torch.isfinite(logit).all())
    # the Discriminator protocol: FSDP2 units, and an optimizer state of this build passes unchanged
    assert all(isinstance(u, torch.nn.Module) for u in disc.fsdp_units())
    osd = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad]).state_dict()
    assert disc.upgrade_optimizer_state_dict(osd) is osd


def test_interface_defaults(built):
    b, student = built, built.student
    assert isinstance(student, StudentBase)
    assert student.default_objective in OBJECTIVES
    json.dumps(student.net_config())
    assert all(isinstance(v, (int, float)) for v in student.step_metrics().values())
    units = student.fsdp_units()
    modules = list(student.network.modules())
    assert all(any(u is m for m in modules) for u in units)
    assert bool(units) == ("fsdp2" in b.family.capabilities)
    preview = student.preview_images(b.batch["states"][:2, -1].float(), torch.device("cpu"))
    if b.family is FlowNetStudent:  # keeps its teacher; a GMM student starts as it: the unrolled solve; no images
        assert student.teacher is not None and student.default_objective == "unrolled" and preview is None
    else:  # the teacher is dropped after build; windows; latents decoded for the sample grid
        assert student.teacher is None and student.default_objective == "windows"
        images, how = preview
        assert images.shape[:2] == (2, 3) and how in ("vae", "latent channels")
        assert float(images.min()) >= 0 and float(images.max()) <= 1


def _perturbed(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: t.detach().clone() + 0.05 * torch.randn(t.shape, generator=g).to(t.dtype)
            if t.is_floating_point() else t.detach().clone() for n, t in tensors.items()}


def test_trainable_state_dict_round_trip_and_ema_names(built):
    student = built.student
    saved = {n: t.detach().clone() for n, t in student.trainable_state_dict().items()}
    assert saved
    new = _perturbed(saved, 3)
    try:
        student.load_trainable_state_dict(new)
        got = student.trainable_state_dict()
        assert list(got) == list(saved)
        for n in new:
            torch.testing.assert_close(got[n], new[n], rtol=0, atol=0)
        missing = dict(new)
        missing.pop(next(iter(missing)))
        with pytest.raises((ValueError, RuntimeError)):  # another student's checkpoint is refused
            student.load_trainable_state_dict(missing)
    finally:
        student.load_trainable_state_dict(saved)
    ema = student.ema_tensors()
    trainable = student.trainable_state_dict()
    assert list(ema) == list(trainable)
    for n, t in trainable.items():
        assert ema[n].shape == t.shape and ema[n].dtype == t.dtype
        assert ema[n].data_ptr() != t.data_ptr()  # its own storage: the EMA updates it in place
        torch.testing.assert_close(ema[n], t, rtol=0, atol=0)


def test_export_then_reload_gives_the_exported_network(built, tmp_path):
    b, student = built, built.student
    _, _, reload = CASES[b.family]
    saved = {n: t.detach().clone() for n, t in student.trainable_state_dict().items()}
    weights = _perturbed(saved, 7)
    run = {"data": b.url, "steps": 3, "stages": [STAGE], "alpha": 1.0, "window_points": "start", "ema": True,
           "objective": student.default_objective, "selected": "last"}
    folder = str(tmp_path / "student")
    os.makedirs(folder)
    files = student.export(weights, folder, run)
    assert files == sorted(files) and all(os.path.isfile(os.path.join(folder, f)) for f in files)
    if b.family.export_entry:
        assert b.family.export_entry in files
    if b.family.folder_kind is not None:
        meta = read_student_meta(folder)
        assert STUDENT_META in files
        assert (meta["kind"], meta["format"]) == (b.family.folder_kind.kind, b.family.folder_kind.format)
        assert meta["num_inference_steps"] == STAGE and meta["lora"] == bool(b.cfg.lora_rank)
    net = reload(folder, student).eval()
    w = _rows(b, 2)
    cond = student.corpus_condition(b.batch)
    try:
        student.load_trainable_state_dict(weights)
        with torch.no_grad():
            expected = student.network(w.x_BX, w.sigma_B, *cond)
    finally:
        student.load_trainable_state_dict(saved)
    with torch.no_grad():
        got = net(w.x_BX, w.sigma_B, *cond)
        before = student.network(w.x_BX, w.sigma_B, *cond)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, before, rtol=1e-4, atol=1e-5)  # the exported weights, not the unperturbed ones


def test_refusals_follow_the_capabilities(built):
    b = built
    raw = b.card.to_dict()
    raw["teacher"]["kind"] = "flux"  # a corpus of a teacher no family distils
    with pytest.raises(ValueError, match="'flux' teacher corpus is not supported by this trainer"):
        check_run(DatasetCard.from_dict(raw), TrainConfig(data=b.url, out="memory://o"))
    for cap, settings in NEEDS.items():
        cfg = TrainConfig(data=b.url, out="memory://o", stages=(STAGE,), batch_size=8, **settings)
        if cap in b.family.capabilities:
            assert check_run(b.card, cfg) is b.family
            continue
        with pytest.raises(ValueError) as e:
            check_run(b.card, cfg)
        if cap == "objective:unrolled":  # word for word (the Trainer says nothing else)
            assert str(e.value) == UNROLLED_REFUSAL.format(display_name=b.family.display_name)
            assert str(e.value).startswith("--objective unrolled (the student's whole few-step solve, gradients "
                                           "through every step) is for flow-net students; ")
        if cap == "fsdp2":
            assert "--parallelism fsdp2 shards diffusers students" in str(e.value)
    if b.family is not FlowNetStudent:
        assert "objective:unrolled" not in b.family.capabilities
    else:
        assert "fsdp2" not in b.family.capabilities
