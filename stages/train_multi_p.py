"""DVC stage ``train_multi_p@<quality>``: warm-up on consecutive P-frames (eq. 5).

Starts from the previous phase's export and writes ``paths.models/<quality>/multi_p/``, the DVC
metrics ``paths.metrics/<quality>/train_multi_p.json`` and the loss curves
``plots/<quality>/train_multi_p.csv``; the work is
:func:`pipeline.train.stage.run_training_stage`.
"""

from __future__ import annotations

from pipeline.cli import run_stage
from pipeline.train.stage import training_stage_main


def main(argv: list[str] | None = None) -> None:
    training_stage_main("multi_p", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    run_stage(main)
