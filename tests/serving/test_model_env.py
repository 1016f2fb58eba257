"""A logged model carries the code inference runs and the packages that code imports, nothing more."""

from __future__ import annotations

from pathlib import Path

from cnmc.core.imports import PACKAGE_DIR, code_closure
from cnmc.serving.model_env import ENTRY, copy_code, requirements


def test_the_closure_is_the_serving_code_and_not_the_project() -> None:
    files, external = code_closure(ENTRY)
    names = {path.relative_to(PACKAGE_DIR).as_posix() for path in files}
    assert {"__init__.py", "serving/pyfunc.py", "inference/tta.py", "models/backbones.py", "data/images.py"} <= names
    for unwanted in (
        "serving/http_app.py",
        "serving/guard.py",
        "cli/__init__.py",
        "training/trainer.py",
        "jobs/tune.py",
        "jobs/explain.py",
        "data/manifest.py",
    ):
        assert unwanted not in names, unwanted
    assert not any(name.startswith("demo_cells") for name in names)
    assert {"torch", "timm", "mlflow", "PIL"} <= external and "optuna" not in external


def test_requirements_are_the_pinned_ones_inference_imports() -> None:
    pinned = requirements()
    assert any(r.startswith("mlflow==") for r in pinned) and any(r.startswith("torch") for r in pinned)
    for unwanted in ("dvc", "optuna", "captum", "scikit-learn", "matplotlib", "efficientnet-lite0"):
        assert not any(r.startswith(unwanted) for r in pinned), unwanted


def test_copy_makes_an_importable_package_without_caches(tmp_path: Path) -> None:
    root = copy_code(tmp_path)
    assert (root / "serving" / "pyfunc.py").is_file() and not list(root.rglob("__pycache__"))
