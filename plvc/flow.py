"""Optical flow: backward warping and the pyramid flow network (paper Fig. 3, SpyNet).

Flow convention (used everywhere in ``plvc``): ``flow[:, 0]`` is the horizontal
displacement ``dx`` and ``flow[:, 1]`` the vertical ``dy``, in pixels of the image it
is applied to, and ``warp(image, flow)[y, x] = image[y + dy, x + dx]`` (backward
warping: each output pixel fetches its value from the reference). To predict frame
``x_i`` from reference ``x_ref`` the flow must satisfy ``x_i[y, x] ~ x_ref[y+dy, x+dx]``;
OpenCV's ``calcOpticalFlow*(x_i, x_ref)`` (e.g. DIS) returns a flow in this convention.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plvc.errors import WeightsError

__all__ = ["SPYNET_LEVELS", "FlowLevel", "PyramidFlow", "pixel_grid", "spynet_state_dict", "warp"]


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

    def load_spynet(self, state: Mapping[str, Tensor]) -> None:
        """Start from a pretrained SpyNet (see :func:`spynet_state_dict`); raises
        :class:`~plvc.errors.WeightsError` naming what differs when the sizes do not fit."""
        converted = spynet_state_dict(state, self.levels)
        own = self.state_dict()
        for key, value in own.items():
            if key not in converted or converted[key].shape != value.shape:
                got = tuple(converted[key].shape) if key in converted else "nothing"
                raise WeightsError(
                    f"SpyNet weights do not fit this flow network: {key} is {tuple(value.shape)}, "
                    f"the weights give {got} (SpyNet: 7x7 convs 8-32-64-32-16-2 per level)"
                )
        extra = sorted(set(converted) - set(own))
        if extra:
            raise WeightsError(f"SpyNet weights have layers this flow network lacks: {extra[:4]}")
        self.load_state_dict(converted)

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


#: levels of a pretrained SpyNet (Ranjan & Black 2017; the PyTorch ports' ``Basic`` modules)
SPYNET_LEVELS = 6

# SpyNet's inputs are RGB normalised with ImageNet's mean and std; ours are RGB in [0, 1]
_SPYNET_MEAN = (0.485, 0.456, 0.406)
_SPYNET_STD = (0.229, 0.224, 0.225)

# sniklaus/pytorch-spynet (``moduleBasic``, renamed ``netBasic``), BasicSR
# (``basic_module.<i>.basic_module.<j>``) and MMEditing/MMagic (``...<j>.conv``)
_SPYNET_KEY = re.compile(
    r"^(?:(?:module|net)Basic|basic_module)\.(\d+)\."
    r"(?:(?:module|net)Basic|basic_module)\.(\d+)\.(?:conv\.)?(weight|bias)$"
)


def spynet_state_dict(state: Mapping[str, Tensor], levels: int) -> dict[str, Tensor]:
    """A pretrained SpyNet's weights as a :class:`PyramidFlow` state dict of ``levels`` levels.

    ``state`` is the state dict of one of SpyNet's PyTorch ports (sniklaus/pytorch-spynet's
    ``network-*.pytorch``, BasicSR's or MMagic's ``spynet_*.pth``; a ``params``/``state_dict``
    wrapper and a ``spynet.`` or ``module.`` prefix are accepted): six levels of 7x7 convs
    8-32-64-32-16-2, whose inputs are ``[target, warped ref, flow]`` with the images
    normalised by ImageNet's mean and std. The conversion is exact up to the borders: the
    two image blocks of each first conv are swapped to our ``[warped ref, target, flow]``
    order and the normalisation is folded into its weights and bias, so the network takes
    RGB in [0, 1] (the folded conv zero-pads in [0, 1] where SpyNet zero-pads normalised
    values, which changes the outermost 3 pixels of each level's first layer). The finest
    ``levels`` levels are kept: a 5-level pyramid (the paper's) drops SpyNet's coarsest.

    Raises :class:`~plvc.errors.WeightsError` when ``state`` is not a SpyNet or does not
    fit: the message says which key or shape is wrong.
    """
    for wrapper in ("params", "state_dict"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    found: dict[tuple[int, int, str], Tensor] = {}
    for key, value in state.items():
        name = key
        for prefix in ("module.", "spynet."):
            name = name.removeprefix(prefix)
        match = _SPYNET_KEY.match(name)
        if match is None:
            continue
        if not isinstance(value, Tensor):
            raise WeightsError(f"SpyNet weights: {key!r} is not a tensor")
        found[(int(match[1]), int(match[2]), match[3])] = value.detach().float()
    if not found:
        sample = ", ".join(list(state)[:3]) or "none"
        raise WeightsError(
            "not a SpyNet state dict: no key like 'netBasic.0.netBasic.0.weight' or "
            f"'basic_module.0.basic_module.0.weight' (first keys: {sample})"
        )
    available = sorted({level for level, _, _ in found})
    if available != list(range(len(available))):
        raise WeightsError(f"SpyNet weights: levels {available} are not 0..n-1")
    if not 1 <= levels <= len(available):
        raise WeightsError(
            f"SpyNet weights have {len(available)} levels; a {levels}-level flow network "
            "cannot take them"
        )
    convs = sorted({conv for _, conv, _ in found})
    mean = torch.tensor(_SPYNET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_SPYNET_STD).view(1, 3, 1, 1)
    out: dict[str, Tensor] = {}
    for ours, theirs in enumerate(available[len(available) - levels :]):
        # our Sequential interleaves ReLUs (convs at 0, 2, 4, ...); MMagic numbers convs only
        for rank, conv in enumerate(convs):
            try:
                weight = found[(theirs, conv, "weight")].clone()
                bias = found[(theirs, conv, "bias")].clone()
            except KeyError as exc:
                raise WeightsError(
                    f"SpyNet weights: level {theirs} conv {conv} has no {exc.args[0][2]}"
                ) from exc
            if conv == convs[0]:
                if weight.shape[1] != 8:
                    raise WeightsError(
                        f"SpyNet weights: level {theirs}'s first conv takes {weight.shape[1]} "
                        "channels, not 8 (target, warped reference, flow)"
                    )
                target, warped, flow = weight[:, :3], weight[:, 3:6], weight[:, 6:]
                target, warped = target / std, warped / std
                bias = bias - ((target + warped) * mean).sum(dim=(1, 2, 3))
                weight = torch.cat([warped, target, flow], dim=1)
            out[f"level_nets.{ours}.net.{2 * rank}.weight"] = weight
            out[f"level_nets.{ours}.net.{2 * rank}.bias"] = bias
    return out
