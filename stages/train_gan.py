"""DVC stage ``train_gan@<quality>``: the recurrent conditional GAN phase (eq. 6, Table 1).

Starts from the previous phase's export and writes ``paths.models/<quality>/gan/``, the DVC
metrics ``paths.metrics/<quality>/train_gan.json`` and the loss curves
``plots/<quality>/train_gan.csv``; the work is
:func:`pipeline.train.stage.run_training_stage`.
"""

from __future__ import annotations

from pipeline.cli import run_stage
from pipeline.train.stage import training_stage_main


def main(argv: list[str] | None = None) -> None:
    training_stage_main("gan", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    run_stage(main)
