"""DVC stage ``iframes@<quality>``: frame 1 of every clip coded with that quality's HiFiC.

Reads ``paths.shards/{train,test}`` and ``paths.models/<q>/hific/hific.pt``; writes
``paths.iframes/<q>/{train,test}/part-*.parquet`` (aligned with the shards, one row per clip:
clip id, decoded I-frame PNG, bitstream, bits) and ``manifest.json``; the schema is in
:mod:`pipeline.data.iframes`. Codes on a Ray Data actor pool (``iframes.num_actors``, GPU actors
with ``iframes.use_gpu``); a re-run keeps the files that are complete for the same shards
and weights. Logs the bpp distribution (and a histogram), the I-frames' PSNR and
side-by-side images to MLflow, and writes ``paths.metrics/<q>/iframes.json``.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.config import QUALITIES

STAGE = "iframes"


def _parser() -> argparse.ArgumentParser:
    from pipeline.cli import stage_parser

    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--quality", required=True, choices=QUALITIES)
    return parser


def _histogram(bpp: dict[str, Any], quality: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for split, values in bpp.items():
        ax.hist(values, bins=min(50, max(5, len(values) // 4)), alpha=0.6, label=split)
    ax.set_xlabel("bits per pixel (real bitstream)")
    ax.set_ylabel("I-frames")
    ax.set_title(f"HiFiC I-frames, quality {quality}")
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import mlflow
    import numpy as np

    from pipeline.config import load_params
    from pipeline.data.iframes import code_iframes, iframe_side_by_side
    from pipeline.data.training_clips import read_iframe_columns
    from pipeline.io import write_json_atomic
    from pipeline.ray_cluster import ray_session
    from pipeline.tracking import log_json_artifact, stage_run

    params = load_params(args.params)
    quality: str = args.quality
    cfg = params.iframes
    weights = params.paths.models / quality / "hific" / "hific.pt"
    out_dir = params.paths.iframes / quality
    logged = {"quality": quality, "iframes": cfg.model_dump(mode="json"), "weights": str(weights)}

    with stage_run(STAGE, params, logged_params=logged, run_name=f"{STAGE}@{quality}"):
        with ray_session(params, lazy=True) as connect_ray:
            result = code_iframes(
                params.paths.shards,
                out_dir,
                weights,
                quality=quality,
                batch_size=cfg.batch_size,
                num_actors=cfg.num_actors,
                use_gpu=cfg.use_gpu,
                start_ray=connect_ray,
            )
        manifest = result["manifest"]
        print(
            f"[{STAGE}@{quality}] {manifest['totals']['clips']} I-frames in {out_dir} "
            f"({result['written']} files coded, {result['kept']} kept)",
            flush=True,
        )

        metrics: dict[str, Any] = {"quality": quality}
        for split, info in manifest["splits"].items():
            metrics[split] = info["stats"]
            mlflow.log_metrics(
                {f"{split}/{k}": float(v) for k, v in info["stats"].items() if np.isfinite(v)}
            )
        mlflow.log_metrics({"files_coded": result["written"], "files_kept": result["kept"]})

        bpp = {}
        for split in manifest["splits"]:
            table = read_iframe_columns(out_dir, split, ["bits", "height", "width"])
            pixels = table.column("height").to_numpy() * table.column("width").to_numpy()
            bpp[split] = table.column("bits").to_numpy() / pixels
        fig = _histogram(bpp, quality)
        mlflow.log_figure(fig, "bpp_histogram.png")
        count = params.tracking.max_logged_images
        if count > 0:
            for split in manifest["splits"]:
                grid = iframe_side_by_side(params.paths.shards / split, out_dir / split, count)
                mlflow.log_image(grid, f"side_by_side_{split}.png")
        log_json_artifact(manifest, "manifest.json")
        write_json_atomic(params.paths.metrics / quality / "iframes.json", metrics)


if __name__ == "__main__":
    from pipeline.cli import run_stage

    run_stage(main)
