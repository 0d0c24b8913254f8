"""The one-way import rule (ARCHITECTURE.md) is enforced by import-linter contracts in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["trajflow", "pipeline", "trainer", "storage_schemas", "flowcore", "models", "evaluation"]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def _copy_tree(tmp_path: Path) -> Path:
    for p in PACKAGES:
        shutil.copytree(ROOT / p, tmp_path / p, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_contracts_hold_on_this_tree(tmp_path):
    r = _lint(_copy_tree(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BROKEN" not in r.stdout


def test_pipeline_importing_trainer_is_caught(tmp_path):
    tree = _copy_tree(tmp_path)
    (tree / "pipeline" / "_violation.py").write_text("import trainer  # noqa\n")
    r = _lint(tree)
    assert r.returncode != 0
    assert "pipeline and trainer never import each other" in r.stdout


def test_flowcore_importing_fsspec_is_caught(tmp_path):
    tree = _copy_tree(tmp_path)
    (tree / "flowcore" / "_violation.py").write_text("import fsspec  # noqa\n")
    r = _lint(tree)
    assert r.returncode != 0
    assert "flowcore is pure" in r.stdout


def test_flowcore_importing_diffusers_is_caught(tmp_path):
    """flowcore is pure math: a model library (even imported inside a function) breaks its contract."""
    tree = _copy_tree(tmp_path)
    (tree / "flowcore" / "_violation.py").write_text("def f():\n    import diffusers  # noqa\n")
    r = _lint(tree)
    assert r.returncode != 0
    assert "flowcore is pure math" in r.stdout


def test_models_importing_the_trainer_is_caught(tmp_path):
    tree = _copy_tree(tmp_path)
    (tree / "models" / "_violation.py").write_text("import trainer.config  # noqa\n")
    r = _lint(tree)
    assert r.returncode != 0
    assert "models is the model layer" in r.stdout
