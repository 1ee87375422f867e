"""Class maps stay aligned with the image; the output-stride-16 backbone option."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from napari_cpgcn.models import Backbone, build_image_model  # noqa: E402
from napari_cpgcn.models.cpgcn import resize_cams  # noqa
from napari_cpgcn.pipeline.inference import predict_images  # noqa
from napari_cpgcn.training.config import ConfigError, ImageModelConfig  # noqa: E402
from napari_cpgcn.training.pseudolabels import cell_mean_activation, image_pseudo_labels  # noqa

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(**kw) -> ImageModelConfig:
    base = dict(backbone="resnet18", variant="cpgcn", image_size=64, imagenet_weights=None,
                gcn_hidden=16, device="cpu")
    base.update(kw)
    return ImageModelConfig(**base)


class _GreenOracle(torch.nn.Module):
    """A 'model' whose class maps are the green channel averaged over stride × stride blocks,
    exactly what a perfectly local network with that feature stride could output."""

    def __init__(self, stride: int = 32, n_classes: int = 19) -> None:
        super().__init__()
        self.stride, self.n_classes = stride, n_classes
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.image_size = 128

    def forward_features(self, x):
        return x

    def forward_head(self, x):
        g = F.avg_pool2d(x[:, 1:2], self.stride)
        return torch.zeros(x.shape[0], self.n_classes), g.repeat(1, self.n_classes, 1, 1)


def _two_cell_image(shape=(160, 224)):
    """Four-channel uint8 image with two square 'cells'; only the first expresses (green)."""
    img = np.zeros((4,) + shape, np.uint8)
    cells = np.zeros(shape, np.int32)
    cells[16:64, 150:198] = 1    # top right, expressing
    cells[96:144, 24:72] = 2     # bottom left, not expressing (a transpose or flip swaps them)
    img[2][cells > 0] = 120      # nuclei/blue in both
    img[1][cells == 1] = 200
    return img, cells


def test_predicted_maps_are_aligned_with_the_image():
    # Guards the CAM geometry (resize to the network input, upsampling back to each image's own
    # non-square size, the pseudo-label resize): the expressing cell must get the higher mean
    # activation, and a transposed or flipped map would give it to the other cell.
    img, cells = _two_cell_image()
    probs, cams = predict_images(_GreenOracle(), [img], cam_method="model")
    assert cams.shape == (1, 19) + cells.shape
    act = np.array([cams[0, 0][cells == i].mean() for i in (1, 2)])
    assert act[0] > 0.5 and act[1] < 0.1, act
    # Feature-resolution maps resized in the pseudo-label step.
    _, raw = predict_images(_GreenOracle(), [img], cam_method="model", cam_size=None)
    a = cell_mean_activation(resize_cams(raw[0, 0], cells.shape), cells, np.array([1, 2]))
    assert a[0] > 0.5 and a[1] < 0.1, a
    labels = np.zeros(19, np.uint8)
    labels[0] = 1
    table = image_pseudo_labels("img", cells, labels, probs[0], raw[0])
    assert table["act_nucleoplasm"].iloc[0] > 0.5 > table["act_nucleoplasm"].iloc[1], table


def test_output_stride_16_doubles_the_map_grid_with_the_same_weights():
    x = torch.rand(1, 4, 128, 128)
    b32 = Backbone("resnet18", output_stride=32)
    b16 = Backbone("resnet18", output_stride=16)
    assert b32(x).shape[-2:] == (4, 4)
    assert b16(x).shape[-2:] == (8, 8)
    # Same parameters: a stride-32 state dict (e.g. ImageNet) loads into the dilated net.
    b16.load_state_dict(b32.state_dict(), strict=True)
    assert Backbone("resnet50", output_stride=16)(x).shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="output_stride"):
        Backbone("resnet18", output_stride=8)
    with pytest.raises(ValueError, match="ResNet"):
        Backbone("mobilenet_v3_small", output_stride=16)


def test_output_stride_config_builds_and_validates():
    cfg = _config(output_stride=16)
    cfg.validate()
    model = build_image_model(cfg, np.eye(19, dtype=np.uint8))
    logits, cams = model(torch.rand(2, 4, 64, 64))
    assert logits.shape == (2, 19) and cams.shape == (2, 19, 4, 4)
    assert ImageModelConfig().output_stride == 32  # the paper's network stays the default
    assert ImageModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "output_stride"}).output_stride == 32
    with pytest.raises(ConfigError, match="output_stride"):
        _config(output_stride=8).validate()
    with pytest.raises(ConfigError, match="ResNet"):
        _config(backbone="densenet121", output_stride=16).validate()
