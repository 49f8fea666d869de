"""MLflow glue: one MLflow run per stage execution, all runs of a pipeline linked.

Every stage wraps its work in :func:`stage_run`. The run is tagged with

- ``plvc.pipeline_id``: shared by every stage of one ``dvc repro`` / ``dvc exp run``
  (derived from the DVC process that launched the stages, or ``PLVC_PIPELINE_ID``),
- ``plvc.git_commit`` and ``plvc.git_dirty``,
- ``plvc.dvc_stage`` (``DVC_STAGE``, e.g. ``train_gan@low``) and ``plvc.dvc_exp_name``,

and is nested under a parent run of that pipeline id, so the MLflow UI shows one pipeline
run with its stages beneath it. ``evaluate_report`` puts the pipeline's summary on that parent
(:func:`log_pipeline_summary`: RD points, BD-rates, the figures, the params an experiment
changed), so selecting two parents and pressing Compare compares two experiments. The
experiment is tagged as model development, so the UI opens it as a runs table.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``tracking.uri`` from params, else MLflow
3's own default, ``sqlite:///mlflow.db`` in the repository root. A remote server that does
not answer fails the stage at its start, before any work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import requests
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline.config import Params, flatten
from pipeline.errors import PipelineError

__all__ = [
    "PIPELINE_ID_ENV",
    "TrackingUnavailableError",
    "configure_tracking",
    "log_json_artifact",
    "log_pipeline_summary",
    "metric_key",
    "params_changed_since_commit",
    "pipeline_id",
    "repo_root",
    "resolve_tracking_uri",
    "stage_run",
]

PIPELINE_ID_ENV = "PLVC_PIPELINE_ID"
_TAG = "plvc."
# MLflow 3's UI opens an experiment without this tag as GenAI (traces), not as a runs table
_EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# mlflow.set_tracking_uri() also writes MLFLOW_TRACKING_URI into the environment; remember
# what we set so a later stage in the same process is not redirected by our own value
_uri_we_set: str | None = None


_STAGE_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingUnavailableError(PipelineError):
    """The MLflow tracking store cannot be reached or opened."""


def repo_root() -> Path:
    """The DVC repository root (``DVC_ROOT`` under dvc), else the git top level, else cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return Path(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return Path.cwd()


def resolve_tracking_uri(params: Params | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` > ``tracking.uri`` > ``sqlite:///<repo>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env != _uri_we_set:
        return env
    if params is not None and params.tracking.uri:
        return params.tracking.uri
    # absolute, so a stage started from another directory still lands in the same store
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def _check_reachable(uri: str, timeout_s: float) -> None:
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            resp = requests.get(health, timeout=timeout_s)
        except requests.RequestException as exc:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}: {exc}). "
                "Start it, fix MLFLOW_TRACKING_URI / tracking.uri, or unset both to use the "
                "local sqlite store."
            ) from None
        if resp.status_code >= 400:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} answered {resp.status_code} on /health"
            )
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise TrackingUnavailableError(f"MLflow store {uri}: folder {db.parent} does not exist")


def configure_tracking(params: Params | None = None) -> str:
    """Point MLflow at the resolved store, check it answers, select the experiment."""
    uri = resolve_tracking_uri(params)
    timeout = params.tracking.connect_timeout_s if params else 5.0
    _check_reachable(uri, timeout)
    if uri.startswith(("http://", "https://")):
        # a server that goes away mid-stage costs seconds per call, not MLflow's default of
        # 7 retries with exponential back-off (minutes each); a user's own setting wins
        for key, value in _STAGE_HTTP_SETTINGS.items():
            os.environ.setdefault(key, value)
    global _uri_we_set
    mlflow.set_tracking_uri(uri)
    _uri_we_set = uri
    experiment = params.tracking.experiment if params else "plvc"
    try:
        if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(experiment) is None:
            # pin artifacts beside the sqlite file; MLflow's default is relative to the cwd
            location = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
            mlflow.create_experiment(experiment, artifact_location=location.as_uri())
        found = mlflow.set_experiment(experiment)
        if found.tags.get(_EXPERIMENT_KIND[0]) is None:
            MlflowClient().set_experiment_tag(found.experiment_id, *_EXPERIMENT_KIND)
    except Exception as exc:  # mlflow raises many types; the message is what matters
        raise TrackingUnavailableError(
            f"MLflow store {uri}: cannot open experiment {experiment!r}: {exc}"
        ) from exc
    return uri


def _dvc_ancestor() -> str | None:
    """pid and start time of the ``dvc`` process that launched this stage, if any."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil ships with ray
        return None
    try:
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = " ".join(proc.cmdline()[:3])
            if proc.name() == "dvc" or "/dvc " in f"{cmd} " or " -m dvc" in cmd:
                return f"{proc.pid}-{proc.create_time():.3f}"
            proc = proc.parent()
    except (psutil.Error, OSError):
        return None
    return None


def pipeline_id() -> str:
    """Identifier shared by every stage of one pipeline execution.

    ``PLVC_PIPELINE_ID`` wins (set it when submitting stages to a cluster by hand); under
    ``dvc repro`` every stage is a child of the same dvc process, whose pid and start
    time name the pipeline; a stage run on its own gets a fresh id.
    """
    if os.environ.get(PIPELINE_ID_ENV):
        return os.environ[PIPELINE_ID_ENV]
    anchor = _dvc_ancestor()
    if anchor is None:
        return uuid.uuid4().hex[:16]
    return hashlib.sha1(f"{os.uname().nodename}-{anchor}".encode()).hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
            cwd=repo_root(),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _pipeline_tags(stage: str, pid: str) -> dict[str, str]:
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        f"{_TAG}pipeline_id": pid,
        f"{_TAG}git_commit": commit,
        f"{_TAG}git_dirty": str(bool(dirty)).lower() if dirty is not None else "unknown",
        f"{_TAG}dvc_stage": os.environ.get("DVC_STAGE", stage),
        f"{_TAG}dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
    }


def _parent_run_id(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str:
    pid = tags[f"{_TAG}pipeline_id"]
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{_TAG}pipeline_id` = '{pid}' and tags.`{_TAG}role` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    name = tags[f"{_TAG}dvc_exp_name"] or f"pipeline-{pid[:8]}"
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={**tags, f"{_TAG}role": "pipeline", f"{_TAG}dvc_stage": ""},
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    *,
    logged_params: Mapping[str, Any] | None = None,
    run_name: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Run a stage as one MLflow run nested under its pipeline's parent run.

    ``logged_params`` are the stage's own knobs (flattened ``a.b`` keys); the seed is
    always logged. A failing stage ends its run as FAILED and re-raises.
    """
    configure_tracking(params)
    pid = pipeline_id()
    tags = _pipeline_tags(stage, pid)
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(params.tracking.experiment)
    assert experiment is not None  # configure_tracking created it
    parent = _parent_run_id(client, experiment.experiment_id, tags)
    tags["mlflow.parentRunId"] = parent
    tags[f"{_TAG}role"] = "stage"
    name = run_name or os.environ.get("DVC_STAGE") or stage
    uri = mlflow.get_tracking_uri()
    run = mlflow.start_run(run_name=name, tags=tags)
    try:
        values = {"seed": params.seed, **flatten(dict(logged_params or {}))}
        # MLflow params are strings of bounded size; lists and None are logged as JSON
        mlflow.log_params(
            {k: json.dumps(v) if not isinstance(v, str) else v for k, v in values.items()}
        )
        print(f"[{name}] MLflow run {run.info.run_id} (pipeline {pid}) in {uri}", flush=True)
        yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        ended = _end_run(status)
        if ended is not None and not _answers(uri, params.tracking.connect_timeout_s):
            raise TrackingUnavailableError(_lost_server_message(name, uri, run, exc)) from exc
        raise
    ended = _end_run("FINISHED")
    if ended is not None:
        raise TrackingUnavailableError(_lost_server_message(name, uri, run, ended)) from ended


def _end_run(status: str) -> Exception | None:
    """End the active run; a store that fails to take it returns the error (MLflow drops
    the run from this process before it calls the store, so a next stage starts clean)."""
    try:
        mlflow.end_run(status)
    except Exception as exc:  # mlflow raises many types; the caller words the message
        return exc
    return None


def _answers(uri: str, timeout_s: float) -> bool:
    try:
        _check_reachable(uri, timeout_s)
    except TrackingUnavailableError:
        return False
    return True


def _lost_server_message(name: str, uri: str, run: Any, cause: BaseException) -> str:
    return (
        f"[{name}] the MLflow store {uri} stopped answering during the stage "
        f"({type(cause).__name__}: {str(cause)[:300]}). Not logged: what the stage logs at its "
        f"end (held-out metrics, metrics.json, result.json, loss curves) and the run's end "
        f"status (run {run.info.run_id} stays RUNNING there). Nothing trained is lost: the "
        "exported weights and the Ray run's checkpoints are kept. Re-run the stage once the "
        "server answers: a run already at its last step is only exported and logged again."
    )


def log_json_artifact(obj: Any, name: str, artifact_path: str | None = None) -> None:
    """Log a JSON-serialisable object as an artifact file ``name``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def metric_key(*parts: str) -> str:
    """An MLflow metric name from parts: ``/``-joined, characters MLflow refuses (``=``,
    ``@``, ...) replaced by ``_``."""
    return "/".join(re.sub(r"[^\w\-. ]", "_", str(part)) for part in parts)


def params_changed_since_commit(params_file: str | os.PathLike[str]) -> dict[str, str]:
    """Flattened params whose value in ``params_file`` differs from the committed file (what
    ``dvc exp run -S`` changed); ``{}`` outside git or for a file git does not track."""
    path = Path(params_file).resolve()
    root = repo_root().resolve()
    try:
        rel = path.relative_to(root)
    except ValueError:
        return {}
    committed = _git("show", f"HEAD:{rel.as_posix()}")
    if committed is None:
        return {}
    try:
        before = flatten(yaml.safe_load(committed) or {})
        after = flatten(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, OSError, AttributeError):
        return {}
    changed = {}
    for key in sorted(set(before) | set(after)):
        if before.get(key, "<absent>") != after.get(key, "<absent>"):
            value = after.get(key, "<removed>")
            changed[key] = value if isinstance(value, str) else json.dumps(value)
    return changed


def log_pipeline_summary(
    metrics: Mapping[str, float],
    artifacts: Sequence[tuple[str | os.PathLike[str], str | None]] = (),
    params: Mapping[str, str] | None = None,
) -> str:
    """Log the pipeline's summary on the parent run of the active stage run; returns its id.

    ``artifacts``: ``(file, artifact folder or None)``. Params are write-once in MLflow: a
    key already logged with another value keeps its first value (noted on stdout). The
    parent's end time moves to now, so its duration spans the pipeline.
    """
    active = mlflow.active_run()
    if active is None:
        raise TrackingUnavailableError("log_pipeline_summary needs an active stage run")
    parent = active.data.tags.get("mlflow.parentRunId")
    if parent is None:
        raise TrackingUnavailableError(f"stage run {active.info.run_id} has no parent run")
    client = MlflowClient()
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    for start in range(0, len(batch), 1000):  # MLflow's batch limit
        client.log_batch(parent, metrics=batch[start : start + 1000])
    existing = client.get_run(parent).data.params
    fresh = [
        Param(key, str(value)[:6000])
        for key, value in (params or {}).items()
        if key not in existing
    ]
    kept = [key for key, value in (params or {}).items() if existing.get(key, value) != value]
    if kept:
        print(f"note: parent run {parent} keeps its first value of {', '.join(kept)}", flush=True)
    for start in range(0, len(fresh), 100):
        client.log_batch(parent, params=fresh[start : start + 100])
    for file, folder in artifacts:
        client.log_artifact(parent, str(file), artifact_path=folder)
    client.set_terminated(parent, "FINISHED", end_time=now)
    return parent
