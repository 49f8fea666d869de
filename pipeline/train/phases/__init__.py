"""Training phases run by :func:`pipeline.train.runner.run_phase`, one module per model:

- :mod:`pipeline.train.phases.hific`: the HiFiC I-frame codec (rate-distortion warm-up, then the
  adversarial phase), for ``stages/train_hific.py``;
- :mod:`pipeline.train.phases.plvc`: PLVC's single-P, multi-P and adversarial phases.

Import the module you need; this package imports neither, so one stays usable while the
other changes.
"""

from __future__ import annotations

__all__: list[str] = []
