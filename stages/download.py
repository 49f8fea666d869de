"""DVC stage ``download``: raw Vimeo-90k septuplets (or the built-in sample) on disk.

Writes ``paths.raw`` in the Vimeo-90k layout plus its ``manifest.json``; see
:mod:`pipeline.data.download` for the sources and the manifest's fields.
"""

from __future__ import annotations

import mlflow

from pipeline.cli import run_stage, stage_parser
from pipeline.config import load_params
from pipeline.data.download import prepare_raw
from pipeline.io import write_json_atomic
from pipeline.tracking import log_json_artifact, stage_run


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = load_params(args.params)
    logged = {
        "download": params.download.model_dump(mode="json"),
        "paths.raw": str(params.paths.raw),
    }
    with stage_run("download", params, logged_params=logged):
        manifest = prepare_raw(params.download, params.paths.raw, params.paths.downloads)
        counts = manifest.get("counts", {})
        metrics = {
            "clips_train": counts.get("train", 0),
            "clips_test": counts.get("test", 0),
            "bytes_total": manifest.get("total_bytes", 0),
            "files": manifest.get("file_count", 0),
        }
        mlflow.log_metrics(metrics)
        log_json_artifact(manifest, "manifest.json")
        _log_sample_frames(params.paths.raw, params.tracking.max_logged_images)
        write_json_atomic(params.paths.metrics / "download.json", metrics)


def _log_sample_frames(raw, limit: int) -> None:
    """A few first frames, so the MLflow run shows what the data looks like."""
    listing = (raw / "sep_trainlist.txt").read_text().split()
    for clip in listing[:: max(1, len(listing) // max(limit, 1))][:limit]:
        frame = raw / "sequences" / clip / "im1.png"
        if frame.is_file():
            mlflow.log_artifact(str(frame), artifact_path=f"frames/{clip.replace('/', '_')}")


if __name__ == "__main__":
    run_stage(main)
