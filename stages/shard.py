"""DVC stage ``shard``: septuplets to Parquet shards per split, bad clips skipped and listed.

Writes ``paths.shards/{train,test}/part-*.parquet`` and ``manifest.json``; the Arrow
schema and the manifest's fields are documented in :mod:`pipeline.data.shards`.
"""

from __future__ import annotations

from pipeline.cli import run_stage, stage_parser


def main(argv: list[str] | None = None) -> None:
    # heavy imports live here: the shard workers re-import this module when they spawn
    import mlflow

    from pipeline.config import load_params
    from pipeline.data.shards import shard_septuplets
    from pipeline.io import write_json_atomic
    from pipeline.tracking import log_json_artifact, stage_run

    args = stage_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = load_params(args.params)
    cfg = params.shard
    with stage_run("shard", params, logged_params={"shard": cfg.model_dump(mode="json")}):
        manifest = shard_septuplets(
            params.paths.raw,
            params.paths.shards,
            rows_per_shard=cfg.rows_per_shard,
            row_group_rows=cfg.row_group_rows,
            max_skipped_fraction=cfg.max_skipped_fraction,
            workers=cfg.workers,
            expected_size=params.frame_size(),
            verify=cfg.verify,
        )
        metrics = {
            f"{split}_{key}": value
            for split, info in manifest["splits"].items()
            for key, value in info.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        mlflow.log_metrics(metrics)
        log_json_artifact(manifest, "manifest.json")
        write_json_atomic(params.paths.metrics / "shard.json", metrics)


if __name__ == "__main__":
    run_stage(main)
