"""A tiny PLVC overfits a short real clip: the rate-distortion loss (eq. 5) must fall."""

from __future__ import annotations

import pytest
import torch

from plvc.generator import PLVC, PLVCConfig
from plvc.losses import multi_p_loss

LMBDA = 256.0  # Table 1, "low"
STEPS = 200
WARMUP_STEPS = 20  # the first steps mostly learn the output offset of the MC network
FACTOR = 3.0


def _eval_loss(model: PLVC, clip: torch.Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        result = multi_p_loss(model(clip, clip[:, 0]), clip, LMBDA)
    model.train()
    return {k: result[k].item() for k in ("loss", "rate_bpp", "psnr")}


@pytest.mark.slow
def test_tiny_model_overfits_a_real_clip(carphone: torch.Tensor) -> None:
    clip = carphone[:3, :, 40:104, 40:136].unsqueeze(0).contiguous()  # I + 2 P, 64x96
    torch.manual_seed(0)
    model = PLVC(PLVCConfig.tiny()).train()
    groups = model.parameter_groups()
    optimizer = torch.optim.Adam(groups["main"], lr=1e-3)
    aux_optimizer = torch.optim.Adam(groups["aux"], lr=1e-2)

    start = _eval_loss(model, clip)
    after_warmup = None
    for step in range(STEPS):
        if step == WARMUP_STEPS:
            after_warmup = _eval_loss(model, clip)
        loss = multi_p_loss(model(clip, clip[:, 0]), clip, LMBDA)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        aux_optimizer.zero_grad()
        model.aux_loss().backward()
        aux_optimizer.step()
    end = _eval_loss(model, clip)

    assert after_warmup is not None
    assert end["loss"] * FACTOR < start["loss"], (start, end)
    # and not only by learning an offset: the loss keeps falling after the warm-up
    assert end["loss"] * FACTOR < after_warmup["loss"], (after_warmup, end)
    assert end["psnr"] > after_warmup["psnr"] + 3.0, (after_warmup, end)
