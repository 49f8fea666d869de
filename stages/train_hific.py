"""DVC stage ``train_hific@<quality>``: the HiFiC I-frame codec, warm-up then adversarial.

Writes ``paths.models/<quality>/hific/`` (``hific.pt``, ``result.json``) and the DVC metrics
``paths.metrics/<quality>/train_hific.json``; with ``hific.pretrained.<quality>`` set it checks
and exports that checkpoint instead. The work is
:func:`pipeline.train.hific_stage.run_hific_stage`.
"""

from __future__ import annotations

from pipeline.cli import run_stage
from pipeline.train.hific_stage import hific_stage_main


def main(argv: list[str] | None = None) -> None:
    hific_stage_main(argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    run_stage(main)
