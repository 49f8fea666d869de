"""Optical flow: backward warping and the pyramid flow network (paper Fig. 3, SpyNet).

Flow convention (used everywhere in ``plvc``): ``flow[:, 0]`` is the horizontal
displacement ``dx`` and ``flow[:, 1]`` the vertical ``dy``, in pixels of the image it
is applied to, and ``warp(image, flow)[y, x] = image[y + dy, x + dx]`` (backward
warping: each output pixel fetches its value from the reference). To predict frame
``x_i`` from reference ``x_ref`` the flow must satisfy ``x_i[y, x] ~ x_ref[y+dy, x+dx]``;
OpenCV's ``calcOpticalFlow*(x_i, x_ref)`` (e.g. DIS) returns a flow in this convention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FlowLevel", "PyramidFlow", "pixel_grid", "warp"]


def pixel_grid(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[1, 2, H, W]`` pixel coordinates ``(x, y)`` of every pixel."""
    ys = torch.arange(height, device=device, dtype=dtype)
    xs = torch.arange(width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).unsqueeze(0)


def warp(image: Tensor, flow: Tensor) -> Tensor:
    """Backward-warp ``image`` [B, C, H, W] by ``flow`` [B, 2, H, W] (pixels, (dx, dy)).

    Bilinear ``grid_sample`` with border padding. Pixel coordinates are normalised with
    ``align_corners=True``, i.e. pixel ``0`` maps to -1 and pixel ``W - 1`` to +1, so
    ``x_norm = 2 x / (W - 1) - 1`` (and the same with ``H`` for y): an integer flow moves
    content by exactly that many pixels at any resolution. Runs in at least float32 with
    autocast off: sampling coordinates in bf16 would be off by whole pixels.
    """
    if image.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(
            f"warp expects image [B, C, H, W] and flow [B, 2, H, W], got "
            f"{tuple(image.shape)} and {tuple(flow.shape)}"
        )
    if image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
        raise ValueError(
            f"warp: image {tuple(image.shape)} and flow {tuple(flow.shape)} differ in "
            "batch or spatial size"
        )
    _, _, height, width = image.shape
    dtype = torch.promote_types(torch.promote_types(image.dtype, flow.dtype), torch.float32)
    with torch.autocast(device_type=image.device.type, enabled=False):
        coords = pixel_grid(height, width, image.device, dtype) + flow.to(dtype)
        scale = torch.tensor(
            [2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], device=image.device, dtype=dtype
        ).view(1, 2, 1, 1)
        grid = (coords * scale - 1.0).permute(0, 2, 3, 1)
        out = F.grid_sample(
            image.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=True
        )
    return out.to(image.dtype)


class FlowLevel(nn.Module):
    """One pyramid level: ``[warped ref, target, flow]`` (8 ch) -> 7x7 convs -> flow update.

    Widths 32-64-32-16-2 in the paper (official ``motion.convnet``). The last conv starts
    at zero so an untrained network predicts zero flow instead of a random warp.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 32, 16), kernel_size: int = 7) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 8
        for width in widths:
            layers += [nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2), nn.ReLU()]
            channels = width
        head = nn.Conv2d(channels, 2, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        layers.append(head)
        self.net = nn.Sequential(*layers)

    def forward(self, warped_ref: Tensor, target: Tensor, flow: Tensor) -> Tensor:
        return self.net(torch.cat([warped_ref, target, flow], dim=1))


class PyramidFlow(nn.Module):
    """SpyNet-style pyramid flow network (Ranjan & Black 2017), paper Fig. 3 "Motion estimation".

    ``forward(ref, target)`` returns the flow that warps ``ref`` onto ``target`` (see the
    module docstring for the convention). Average-pool pyramids of ``levels`` levels;
    from the coarsest level (flow 0) to the finest, each level upsamples the flow
    (bilinear, values x2), warps the reference with it and adds the residual its
    :class:`FlowLevel` predicts. Inputs of any size are replicate-padded internally to a
    multiple of ``2 ** (levels - 1)`` and the flow is cropped back.
    """

    def __init__(
        self, levels: int = 5, widths: Sequence[int] = (32, 64, 32, 16), kernel_size: int = 7
    ) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError("PyramidFlow needs at least one level")
        self.levels = levels
        self.level_nets = nn.ModuleList(FlowLevel(widths, kernel_size) for _ in range(levels))

    @property
    def multiple(self) -> int:
        """Side lengths are padded internally to a multiple of this."""
        return 2 ** (self.levels - 1)

    def forward(self, ref: Tensor, target: Tensor) -> Tensor:
        return self.forward_pyramid(ref, target)[-1]

    def forward_pyramid(self, ref: Tensor, target: Tensor) -> list[Tensor]:
        """Flows of every level, coarsest first; the last one is at full input size.

        The per-level flows allow the official multi-scale warping loss (see
        :func:`plvc.losses.flow_warp_loss`) when the network is trained on its own.
        """
        if ref.shape != target.shape:
            raise ValueError(
                f"reference {tuple(ref.shape)} and target {tuple(target.shape)} differ"
            )
        height, width = ref.shape[-2:]
        refs, targets = self.pyramid(ref), self.pyramid(target)
        b, _, h0, w0 = refs[0].shape
        flow = ref.new_zeros((b, 2, h0, w0))
        flows = []
        for level, net in enumerate(self.level_nets):
            if level > 0:
                flow = 2.0 * F.interpolate(
                    flow, scale_factor=2.0, mode="bilinear", align_corners=False
                )
            flow = flow + net(warp(refs[level], flow), targets[level], flow)
            flows.append(flow)
        # coarser levels keep the padded size; the full-resolution flow is cropped back
        flows[-1] = flows[-1][..., :height, :width]
        return flows

    def pyramid(self, image: Tensor) -> list[Tensor]:
        """Average-pool pyramid of ``image`` padded to :attr:`multiple`, coarsest first."""
        height, width = image.shape[-2:]
        pad_h, pad_w = (-height) % self.multiple, (-width) % self.multiple
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        levels = [image]
        for _ in range(self.levels - 1):
            levels.insert(0, F.avg_pool2d(levels[0], 2))
        return levels
