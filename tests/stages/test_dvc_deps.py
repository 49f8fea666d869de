"""dvc.yaml's code deps cover every module a stage runs, so a code change re-runs its stages.

The walk follows every ``import`` of the project's own packages, function-level ones too (the
stages import heavy modules lazily), from each stage's ``stages/<name>.py``. It is static: a
module reached only through ``importlib`` would escape it, and the project has none.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages", "plvc")


def _module_file(name: str) -> Path | None:
    """The file of a project module ``a.b.c`` (a package's ``__init__.py``), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    """Dotted names of the project modules ``path`` imports (``from a import b`` may name a
    submodule ``a.b`` or an attribute of ``a``: both are tried)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def imported_files(entry: Path) -> set[Path]:
    """Every project file ``entry`` reaches through imports, itself and packages included."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            parts = name.split(".")
            # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            for k in range(1, len(parts) + 1):
                file = _module_file(".".join(parts[:k]))
                if file is not None and file not in seen:
                    todo.append(file)
    return seen


def _stages() -> dict[str, dict]:
    """dvc.yaml's stages with ``foreach`` expanded once (the deps are alike per item)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    out = {}
    for name, stage in spec["stages"].items():
        if "foreach" in stage:
            stage = stage["do"]
        out[name] = stage
    return out


def _runs_code(path: Path) -> bool:
    """False for a module that is only a docstring (an empty ``__init__.py``): nothing in it
    can change what a stage does."""
    body = ast.parse(path.read_text()).body
    return any(
        not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body
    )


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    if not _runs_code(path):
        return True
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps if not d.startswith("$"))


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_cover_the_code_it_imports(stage: str) -> None:
    spec = _stages()[stage]
    module = spec["cmd"].split()[spec["cmd"].split().index("-m") + 1]
    entry = _module_file(module)
    assert entry is not None, f"{stage}: cmd {spec['cmd']!r} names no module of this repo"
    missing = sorted(
        str(p.relative_to(REPO)) for p in imported_files(entry) if not _covered(p, spec["deps"])
    )
    assert not missing, (
        f"dvc.yaml stage {stage!r} runs code its deps do not list, so changing it would not "
        f"re-run the stage: {missing}"
    )


def test_walk_sees_lazy_imports() -> None:
    """The walk must reach modules a stage imports inside functions (heavy imports are lazy):
    ``stages/train_single_p.py`` trains through Ray and reads I-frames, so it must reach the
    runner's worker loop and the training-clip reader."""
    files = {str(p.relative_to(REPO)) for p in imported_files(REPO / "stages/train_single_p.py")}
    assert "pipeline/train/worker.py" in files
    assert "pipeline/data/training_clips.py" in files
    assert "plvc/generator.py" in files


def test_evaluate_params_name_every_key_but_the_anchors() -> None:
    """evaluate@q lists evaluate's keys one by one (so a change of the anchors re-runs only
    evaluate_baselines): a key added to EvaluateConfig must be listed too, or changing it
    would not re-run the evaluation."""
    from pipeline.config import EvaluateConfig

    params = _stages()["evaluate"]["params"]
    listed = {p.split(".", 1)[1] for p in params if p.startswith("evaluate.")}
    assert listed == set(EvaluateConfig.model_fields) - {"baselines"}
    assert "evaluate" in _stages()["evaluate_baselines"]["params"]
