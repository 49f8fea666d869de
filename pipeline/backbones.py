"""Pretrained backbones of the perceptual losses and metrics: LPIPS (AlexNet trunk + the linear
layers the lpips wheel ships) and the TF-compatible Inception of FID/KID. Files are never
downloaded here: a path param names them, else torch's hub cache is looked in, and a missing
file is a :class:`MissingWeightsError` naming the param. Used by training (GAN losses) and
evaluation alike, so it sits above both.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.errors import PipelineError
from plvc.errors import WeightsError

__all__ = [
    "InceptionFeatures",
    "MissingWeightsError",
    "build_lpips",
    "default_alexnet_path",
    "default_inception_path",
    "load_flow_weights",
    "load_inception",
    "load_lpips",
    "load_lpips_trunk",
    "resolve_weights",
]


_ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision AlexNet_Weights.IMAGENET1K_V1


_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity 0.2.0 release


class MissingWeightsError(PipelineError, WeightsError):
    """A metric backbone's weights are not available; the message names the param."""


def _hub_checkpoint(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def default_alexnet_path() -> Path:
    """Where torchvision caches AlexNet's ImageNet weights (what ``lpips`` would download)."""
    return _hub_checkpoint(_ALEXNET_FILE)


def default_inception_path() -> Path:
    """Where torch-fidelity / torchmetrics cache the FID Inception weights."""
    return _hub_checkpoint(_INCEPTION_FILE)


def resolve_weights(explicit: Path | str | None, cached: Path, param: str, what: str) -> Path:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"{param} = {str(explicit)!r}: no such file ({what})")
        return path
    if cached.is_file():
        return cached
    raise MissingWeightsError(
        f"{what} not found: set {param} to the weights file (it is not in the cache either: "
        f"{cached}). Weights cannot be downloaded here; copy the file there or point {param} at it."
    )


def load_lpips_trunk(path: str | Path | None, param: str) -> dict[str, Tensor]:
    """The five AlexNet convs of LPIPS(alex), read from a torchvision AlexNet state dict.

    Returns the state dict of ``lpips.LPIPS(net="alex").net`` (keys ``sliceK.<i>.*``): small
    enough to travel with a pickled training phase, so Ray workers need not see ``path``.
    Raises :class:`MissingWeightsError` naming ``param`` when the path is unset, missing,
    unreadable or not AlexNet's. The one LPIPS loader of the project (evaluation, HiFiC's and
    PLVC's training losses).
    """
    if path is None:
        raise MissingWeightsError(
            f"{param} is not set, but LPIPS needs AlexNet weights: set it to a torchvision "
            f"AlexNet state dict ({_ALEXNET_FILE})"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(
            f"{param} = {str(path)!r}: no such file (AlexNet weights for LPIPS)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MissingWeightsError(
            f"{param} = {str(path)!r}: cannot read AlexNet weights: {exc}"
        ) from exc
    if not isinstance(state, Mapping):
        raise MissingWeightsError(f"{param} = {str(path)!r}: not a state dict")
    out = {}
    for key, own in _lpips_alex(seed=0).net.state_dict().items():
        source = "features." + key.split(".", 1)[1]  # slice2.3.weight <- features.3.weight
        value = state.get(source)
        if not isinstance(value, Tensor) or value.shape != own.shape:
            raise MissingWeightsError(
                f"{param} = {str(path)!r}: not a torchvision AlexNet state dict "
                f"({source} missing or of the wrong shape)"
            )
        out[key] = value.float()
    return out


def load_flow_weights(path: str | Path, param: str) -> Mapping[str, Any]:
    """A pretrained optical-flow checkpoint (a SpyNet port's state dict, see
    :func:`plvc.flow.spynet_state_dict`), read on the driver. Raises
    :class:`MissingWeightsError` naming ``param`` when the file is missing or unreadable."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingWeightsError(
            f"{param} = {str(path)!r}: no such file (pretrained SpyNet weights, e.g. "
            "sniklaus/pytorch-spynet's network-sintel-final.pytorch). Set it to null to learn "
            "the flow from scratch in the flow warm-up (train.single_p.flow_steps)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MissingWeightsError(f"{param} = {str(path)!r}: cannot read it: {exc}") from exc
    if not isinstance(state, Mapping):
        raise MissingWeightsError(f"{param} = {str(path)!r}: not a state dict")
    return state


def build_lpips(trunk: Mapping[str, Tensor] | None = None, *, seed: int = 0) -> nn.Module:
    """Frozen LPIPS(alex, v0.1) with the AlexNet ``trunk`` (:func:`load_lpips_trunk`), or a
    trunk randomly initialised from ``seed`` when None (code-path tests only: not the metric).
    The linear v0.1 heads ship inside the ``lpips`` package."""
    model = _lpips_alex(seed)
    if trunk is not None:
        model.net.load_state_dict(dict(trunk))
    return model.eval().requires_grad_(False)


def _lpips_alex(seed: int) -> nn.Module:
    import lpips

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # lpips 0.1.4 still calls torchvision's deprecated ``pretrained=`` argument
        warnings.filterwarnings("ignore", category=UserWarning)
        torch.manual_seed(seed)
        # pnet_rand=True: build the trunk without lpips asking torchvision to download it
        return lpips.LPIPS(
            net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False
        )


def load_lpips(path: Path | None, seed: int) -> nn.Module:
    """LPIPS for evaluation: the trunk from ``path`` (``evaluate.lpips_backbone``) or random."""
    trunk = load_lpips_trunk(path, "evaluate.lpips_backbone") if path is not None else None
    return build_lpips(trunk, seed=seed)


def load_inception(path: Path | None, seed: int) -> nn.Module:
    """torch-fidelity's TF-compatible Inception-v3 (via torchmetrics) giving 2048-d features."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    kwargs: dict[str, Any] = {
        "name": "inception-v3-compat",
        "features_list": ["2048"],
        "antialias": False,
    }
    if path is not None:
        try:
            return NoTrainInceptionV3(feature_extractor_weights_path=str(path), **kwargs)
        except Exception as exc:
            raise MissingWeightsError(
                f"evaluate.inception_weights = {str(path)!r}: not the FID Inception weights "
                f"({_INCEPTION_FILE} of torch-fidelity): {exc}"
            ) from exc

    class _RandomInitInceptionV3(NoTrainInceptionV3):
        def load_state_dict(
            self, state_dict: Any, strict: bool = True, assign: bool = False
        ) -> Any:
            # keep PyTorch's seeded default initialisation: there are no weights to load
            return nn.modules.module._IncompatibleKeys([], [])

    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        model = _RandomInitInceptionV3(feature_extractor_weights_path=str(empty), **kwargs)
        # PyTorch's default init shrinks activations ~3x per layer: after Inception's ~90
        # convs the features are ~1e-8 and every FID is 0. He init keeps them O(1).
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        return model


class InceptionFeatures(nn.Module):
    """Identity 'extractor' handing precomputed features to torchmetrics' FID/KID."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features
