"""Four-channel CNN backbones from torchvision with a ``forward_features`` / ``forward_head`` split.

Every backbone takes (B, 4, Y, X) images in [0, 1] (channel order red, green, blue, yellow),
normalises them with per-channel mean/std buffers (so a checkpoint carries its own
normalisation), and returns the last feature map (B, D, Y/32, X/32), or Y/16 with ``output_stride=16``.

ImageNet weights come from a given path, from the torch hub cache
(``torch.hub.get_dir()/checkpoints/<torchvision file name>``), or -- asked for and absent --
from a verified download when the network answers (:mod:`napari_cpgcn.models.weights`).
Offline, a clear message is logged within seconds and the backbone starts from random
weights. Nothing is downloaded at import, nor ever with ``weights=None``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from napari_cpgcn.models.weights import WeightsDownloadError, WeightsNotFoundError, is_url

__all__ = [
    "BACKBONES",
    "Backbone",
    "WeightsDownloadError",
    "WeightsNotFoundError",
    "adapt_input_conv",
    "imagenet_weight_candidates",
    "find_imagenet_weights",
    "torchvision_weights_url",
]

log = logging.getLogger(__name__)

#: name -> (torchvision builder name, weights enum name, feature channels)
BACKBONES: dict[str, tuple[str, str, int]] = {
    "resnet18": ("resnet18", "ResNet18_Weights", 512),
    "resnet34": ("resnet34", "ResNet34_Weights", 512),
    "resnet50": ("resnet50", "ResNet50_Weights", 2048),
    "densenet121": ("densenet121", "DenseNet121_Weights", 1024),
    "efficientnet_b0": ("efficientnet_b0", "EfficientNet_B0_Weights", 1280),
    "mobilenet_v3_small": ("mobilenet_v3_small", "MobileNet_V3_Small_Weights", 576),
    "mobilenet_v3_large": ("mobilenet_v3_large", "MobileNet_V3_Large_Weights", 960),
}

#: Default per-channel statistics of HPA images scaled to [0, 1] (red, green, blue, yellow);
#: the image trainer replaces them by the training set's own statistics.
DEFAULT_MEAN: tuple[float, ...] = (0.08, 0.05, 0.05, 0.08)
DEFAULT_STD: tuple[float, ...] = (0.13, 0.10, 0.10, 0.13)


def adapt_input_conv(in_chans: int, conv_weight: torch.Tensor) -> torch.Tensor:
    """Adapt an RGB stem kernel (O, 3, k, k) to ``in_chans`` input channels, as timm does.

    One channel: the sum over RGB. More than three: the RGB kernel is repeated over the new
    channels and rescaled by ``3 / in_chans`` so that the activation scale is preserved.
    """
    dtype = conv_weight.dtype
    w = conv_weight.float()
    o, i, kh, kw = w.shape
    if i != 3:
        if i == in_chans:
            return conv_weight
        raise ValueError(f"cannot adapt a stem with {i} input channels (expected 3)")
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        repeat = int(math.ceil(in_chans / 3))
        w = w.repeat(1, repeat, 1, 1)[:, :in_chans, :, :]
        w *= 3.0 / float(in_chans)
    return w.to(dtype)


def imagenet_weight_candidates(name: str) -> list[str]:
    """torchvision file names of the ImageNet weights of a backbone (default first)."""
    import torchvision.models as tvm

    enum = getattr(tvm, BACKBONES[name][1])
    names = [Path(enum.DEFAULT.url).name]
    for w in enum:
        fn = Path(w.url).name
        if fn not in names:
            names.append(fn)
    return names


def torchvision_weights_url(name: str) -> str:
    """torchvision's download URL of the default ImageNet weights of a backbone."""
    import torchvision.models as tvm

    return getattr(tvm, BACKBONES[name][1]).DEFAULT.url


def find_imagenet_weights(name: str) -> Path | None:
    """The first torchvision weight file of ``name`` found in the torch hub cache, or None."""
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    for fn in imagenet_weight_candidates(name):
        if (ckpt_dir / fn).is_file():
            return ckpt_dir / fn
    return None


def _stem_path(name: str) -> str:
    """Dotted attribute path of the first convolution inside the torchvision model."""
    if name.startswith("resnet"):
        return "conv1"
    if name.startswith("densenet"):
        return "features.conv0"
    return "features.0.0"  # efficientnet / mobilenet_v3


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, new: nn.Module) -> None:
    parts = path.split(".")
    parent = _get(module, ".".join(parts[:-1])) if len(parts) > 1 else module
    setattr(parent, parts[-1], new)


def _fix_densenet_keys(state: dict) -> dict:
    # Old torchvision DenseNet files name layers "norm.1" instead of "norm1" (same fix as torchvision).
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    out = {}
    for k, v in state.items():
        m = pattern.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _dilate_last_stage(stage: nn.Sequential) -> None:
    """Output stride 32 → 16: stride 1 in the stage's first block, dilation 2 in the others.

    The pattern of torchvision's ``replace_stride_with_dilation`` (which refuses the BasicBlock
    ResNets 18/34); no weight changes shape, so ImageNet weights load as before.
    """
    for i, block in enumerate(stage):
        for conv in block.modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            if i == 0:
                conv.stride = (1, 1)
            elif conv.kernel_size == (3, 3):
                conv.dilation, conv.padding = (2, 2), (2, 2)


class Backbone(nn.Module):
    """A torchvision CNN trunk taking four-channel images in [0, 1].

    Parameters
    ----------
    name
        One of :data:`BACKBONES`.
    in_chans
        Input channels (4 for HPA images).
    weights
        ``None`` (random init; never touches the network), ``"imagenet"`` (the torch hub
        cache, else a verified download; offline → a logged message and random init, see
        :func:`~napari_cpgcn.models.weights.fetch_imagenet_weights`), an http(s) URL (a
        mirror: its folder, or the hub-named file itself) or a path to a torchvision-format
        state dict (absent or not fitting → :class:`WeightsNotFoundError`; a refused
        download → :class:`WeightsDownloadError`).
    mean, std
        Per-channel normalisation applied to the [0, 1] input; stored as buffers so checkpoints
        carry them.
    output_stride
        32 (the torchvision network) or 16: the last ResNet stage keeps the resolution and
        dilates its convolutions instead (``replace_stride_with_dilation=[False, False, True]``,
        as in DeepLab / weakly supervised segmentation), giving a 2× finer class-map grid with
        the same weights. ResNets only.

    Attributes
    ----------
    out_channels : int
        Channels D of the feature map.
    weights_source : str
        Where the initial weights came from (``"random"``, or a file path).
    weights_message : str
        For ``"imagenet"`` or a URL: the one-line decision (``ImageNet weights ... from PATH``,
        ``... downloaded from URL``, or ``offline: ...; starting from random init ...``), for
        the trainers' first events; "" otherwise.
    """

    def __init__(
        self,
        name: str = "resnet50",
        in_chans: int = 4,
        weights: str | Path | None = None,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        import torchvision.models as tvm

        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean/std need {in_chans} values, got {len(mean)}/{len(std)}")
        self.name = name
        self.in_chans = in_chans
        self.out_channels = BACKBONES[name][2]
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride!r}")
        if output_stride != 32 and not name.startswith("resnet"):
            raise ValueError(f"output_stride {output_stride} needs a ResNet backbone, not {name!r}")
        self.output_stride = int(output_stride)
        net = getattr(tvm, BACKBONES[name][0])(weights=None)
        if output_stride == 16:
            _dilate_last_stage(net.layer4)
        self.weights_source = "random"
        self.weights_message = ""
        path = self._resolve_weights(weights)
        if path is not None:
            self._load_rgb_weights(net, path)
            self.weights_source = str(path)
        # Replace the RGB stem by a four-channel one (adapting the loaded RGB kernel).
        stem_path = _stem_path(name)
        stem: nn.Conv2d = _get(net, stem_path)
        new = nn.Conv2d(in_chans, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                        bias=stem.bias is not None)
        if path is not None:
            with torch.no_grad():
                new.weight.copy_(adapt_input_conv(in_chans, stem.weight))
                if stem.bias is not None:
                    new.bias.copy_(stem.bias)
        _set(net, stem_path, new)
        if name.startswith("resnet"):
            self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                       net.layer1, net.layer2, net.layer3, net.layer4)
        elif name.startswith("densenet"):
            self.trunk = nn.Sequential(net.features, nn.ReLU(inplace=False))
        else:
            self.trunk = net.features
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def _resolve_weights(self, weights: str | Path | None) -> Path | None:
        if weights is None or weights == "" or weights == "none":
            return None
        if str(weights).lower() == "imagenet" or is_url(weights):
            from napari_cpgcn.models.weights import fetch_imagenet_weights

            decision = fetch_imagenet_weights(self.name, str(weights))
            self.weights_message = decision.message()
            (log.info if decision.weights is not None else log.warning)("%s", self.weights_message)
            return decision.weights
        p = Path(weights).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(
                f"weight file {p} does not exist; give the path of a torchvision {self.name} state "
                f"dict (e.g. {imagenet_weight_candidates(self.name)[0]}) or omit it to train from scratch"
            )
        return p

    def _load_rgb_weights(self, net: nn.Module, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            raise WeightsNotFoundError(f"cannot read weight file {path}: {e}") from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if self.name.startswith("densenet"):
            state = _fix_densenet_keys(state)
        # The classifier of the file is not used; drop it so class counts never clash.
        own = net.state_dict()
        state = {k: v for k, v in state.items() if k in own and not k.startswith(("fc.", "classifier."))}
        missing = [k for k in own if k not in state and not k.startswith(("fc.", "classifier."))]
        if missing:
            raise WeightsNotFoundError(
                f"{path} does not hold {self.name} weights ({len(missing)} tensors missing, e.g. "
                f"{missing[0]}); give a torchvision {self.name} file such as "
                f"{imagenet_weight_candidates(self.name)[0]}"
            )
        bad = [k for k, v in state.items() if v.shape != own[k].shape]
        if bad:
            raise WeightsNotFoundError(f"{path}: tensor shapes do not fit {self.name} (e.g. {bad[0]})")
        net.load_state_dict(state, strict=False)
        log.info("loaded ImageNet weights for %s from %s", self.name, path)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images → normalised network input."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, Y, X) images in [0, 1] → feature map (B, D, h, w)."""
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans}-channel images, got shape {tuple(x.shape)}")
        return self.trunk(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pooling of a feature map → (B, D)."""
        return F.adaptive_avg_pool2d(features, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
