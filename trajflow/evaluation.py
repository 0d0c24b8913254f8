"""`trajflow eval`: load an exported student and report its metrics next to the teacher's."""

from __future__ import annotations

import json
import os
import sys
import tempfile

from models.flownet import load_flow_net
from models.gmm import GMMTeacher
from storage_schemas import DatasetCard
from trajflow.args import one_line


def student_file(url: str, storage_options=None) -> tuple[object, str, str]:
    """(fs, path of the student .safetensors, URL of its folder) for a run URL, its student/ dir, or the file."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url, **(storage_options or {}))
    candidates = [path] if path.endswith(".safetensors") else [f"{path.rstrip('/')}/student/student.safetensors",
                                                               f"{path.rstrip('/')}/student.safetensors"]
    for c in candidates:
        if fs.exists(c):
            folder = c.rsplit("/", 1)[0] if "/" in c else "."
            protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
            return fs, c, (folder if "file" in protocols or "local" in protocols else fs.unstrip_protocol(folder))
    raise FileNotFoundError(f"no exported student at {url} (looked for {', '.join(candidates)})")


def load_student(url: str, storage_options=None):
    """(net, extra) from a run URL, its student/ dir, or the .safetensors itself."""
    fs, path, _ = student_file(url, storage_options)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "student.safetensors")
        fs.get_file(path, local)
        return load_flow_net(local)


def student_steps(extra: dict) -> int:
    """The step count an exported flow-net student was distilled for (its last stage; 4 for files that do
    not record it)."""
    for key in ("num_inference_steps", "final_stage"):
        n = extra.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
            return n
    return 4


def run_eval(args) -> int:
    from evaluation.gmm import evaluate_gmm
    from trainer.teacher import teacher_from_card

    try:
        net, extra = load_student(args.student, args.storage_options)
        _, _, folder = student_file(args.student, args.storage_options)
        if not isinstance(extra, dict) or not isinstance(extra.get("card"), dict):
            raise ValueError(f"the student file at {args.student} does not record its corpus card (metadata 'card')")
        card = DatasetCard.from_json(json.dumps(extra["card"]))
    except (FileNotFoundError, ValueError) as e:
        print(f"trajflow eval: error: {one_line(e)}", file=sys.stderr)
        return 1
    # the student file is input: what its card names is opened only under the student's folder or an allowed prefix
    teacher = teacher_from_card(card, args.storage_options, root=folder,
                                allow=getattr(args, "allow_teacher_locations", None) or (),
                                root_what="the student's folder", source="the student file's card")
    from models.digits import DigitsTeacher

    if isinstance(teacher, DigitsTeacher):  # the digits testbed: classifier-feature metrics (evaluation.digits)
        return run_digits_eval(args, net, extra, card, teacher)
    if not isinstance(teacher, GMMTeacher):
        print("trajflow eval: exact metrics need a GMM teacher corpus; other teachers come with issue 7",
              file=sys.stderr)
        return 1
    g = card.solver.guidance
    guidance = float(g) if isinstance(g, (int, float)) else (g.min + g.max) / 2
    steps = tuple(args.steps) if args.steps else (student_steps(extra),)
    report = evaluate_gmm(net, teacher, shift=float(extra.get("shift", 1.0)), guidance=guidance, steps=steps,
                          num_samples=args.num_samples, teacher_steps=tuple(sorted({*steps, 32})),
                          default_grid_steps=steps)
    report["student_url"] = args.student
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rows = []
    for n in steps:  # the teacher's own few steps at every count the student is reported at
        rows.append((f"teacher {n} steps (diffusers default grid)", report["teacher"][f"{n}_steps_diffusers_default_grid"]))
        rows.append((f"teacher {n} steps (corrected grid)", report["teacher"][f"{n}_steps"]))
    rows.append(("teacher 32 steps", report["teacher"]["32_steps"]))
    rows += [(f"student {k.replace('_', ' ')}", v) for k, v in report["student"].items()]
    print(f"{'sampler':42s} {'coupling':>9s} {'SWD':>8s} {'NLL/dim':>8s} {'class acc':>9s}")
    for name, q in rows:
        print(f"{name:42s} {q['coupling_error']:9.4f} {q['swd']:8.4f} {q['nll_per_dim']:8.3f} "
              f"{q.get('class_accuracy', float('nan')):9.3f}")
    for k, v in report["student"].items():
        print(f"one-jump error per window, student {k}: {[round(x, 4) for x in v['one_jump_error_per_window']]} "
              f"(teacher Euler: {[round(x, 4) for x in v['teacher_one_jump_error_per_window']]})")
    return 0


def run_digits_eval(args, net, extra, card, teacher) -> int:
    """`trajflow eval` of a digits-testbed student: coupling error against the teacher's 256-step endpoint,
    Frechet distance in the evaluation classifier's feature space, class accuracy; the teacher at the same
    step counts on both grids; ``--grid PNG`` writes a sample grid."""
    from evaluation.digits import evaluate_digits, write_sample_grid

    g = card.solver.guidance
    guidance = float(g) if isinstance(g, (int, float)) else (g.min + g.max) / 2
    args.steps = tuple(args.steps) if args.steps else (student_steps(extra),)
    report = evaluate_digits(net, teacher, shift=float(extra.get("shift", 1.0)), guidance=guidance,
                             steps=tuple(args.steps), num_samples=args.num_samples)
    samples = report.pop("grid_samples")
    report["student_url"] = args.student
    if getattr(args, "grid", None):
        report["grid_png"] = write_sample_grid(list(samples.items()), args.grid,
                                               title=f"digits testbed: {args.student}")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    clf = report["classifier"]
    print(f"digits testbed, {report['num_samples']} samples, guidance {guidance}; reference: {report['reference']}; "
          f"classifier held-out accuracy {clf['held_out_accuracy']:.3f}")
    rows = []
    for n in args.steps:
        rows.append((f"teacher {n} steps (diffusers default grid)", report["teacher"][f"{n}_steps_diffusers_default_grid"]))
        rows.append((f"teacher {n} steps (corrected grid)", report["teacher"][f"{n}_steps"]))
    rows.append(("teacher 32 steps", report["teacher"]["32_steps"]))
    rows += [(f"student {k.replace('_', ' ')}", v) for k, v in report["student"].items()]
    print(f"{'sampler':44s} {'coupling':>9s} {'FD':>9s} {'class acc':>9s}")
    for name, q in rows:
        print(f"{name:44s} {q['coupling_error']:9.4f} {q['frechet_distance']:9.2f} {q['class_accuracy']:9.3f}")
    ref = report["reference_quality"]
    print(f"{'reference (teacher 256 Heun)':44s} {'':>9s} {ref['frechet_distance']:9.2f} {ref['class_accuracy']:9.3f}")
    if report.get("grid_png"):
        print(f"sample grid: {report['grid_png']}")
    return 0
