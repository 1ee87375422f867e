"""Model pieces: backbones, stem adaptation, ImageNet weight lookup, CPM, label GCN, CP-GCN variants."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch  # noqa: E402

from napari_cpgcn.classes import N_CLASSES  # noqa: E402
from napari_cpgcn.models import (  # noqa: E402
    BACKBONES,
    VARIANTS,
    Backbone,
    ClassPerceptionModule,
    GraphConvolution,
    LabelGCN,
    adapt_input_conv,
    build_image_model,
    label_adjacency,
    load_label_vectors,
    normalize_cams,
)
from napari_cpgcn.models.backbone import WeightsNotFoundError, imagenet_weight_candidates  # noqa: E402
from napari_cpgcn.models.gcn import cooccurrence_adjacency, normalize_adjacency  # noqa: E402
from napari_cpgcn.training.config import ImageModelConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub dir with no weights (as on an offline machine without a cache)."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_shapes(name):
    bb = Backbone(name, in_chans=4, weights=None).eval()
    with torch.no_grad():
        f = bb.forward_features(torch.rand(1, 4, 64, 64))
        g = bb.forward_head(f)
    assert f.shape[:2] == (1, bb.out_channels) and f.shape[2:] == (2, 2)
    assert g.shape == (1, bb.out_channels)


def test_backbone_rejects_wrong_channels():
    bb = Backbone("resnet18", weights=None)
    with pytest.raises(ValueError, match="4-channel"):
        bb(torch.rand(1, 3, 64, 64))


def test_adapt_input_conv_like_timm():
    w = torch.randn(8, 3, 3, 3)
    w4 = adapt_input_conv(4, w)
    assert w4.shape == (8, 4, 3, 3)
    # timm: repeat RGB over the new channels, keep the first 4, scale by 3/4.
    np.testing.assert_allclose(w4[:, :3], w * 0.75, rtol=1e-6)
    np.testing.assert_allclose(w4[:, 3], w[:, 0] * 0.75, rtol=1e-6)
    np.testing.assert_allclose(adapt_input_conv(1, w)[:, 0], w.sum(1), rtol=1e-6)


def test_imagenet_offline_absent_falls_back_fast(empty_hub, caplog):
    # offline: the conftest points the weight URL at a loopback port that refuses connections
    t0 = time.perf_counter()
    with caplog.at_level("WARNING"):
        bb = Backbone("resnet50", weights="imagenet")
    assert time.perf_counter() - t0 < 10
    assert bb.weights_source == "random"
    msg = caplog.text
    assert "offline: no ImageNet weights for resnet50" in msg and "starting from random init" in msg
    assert f"put {imagenet_weight_candidates('resnet50')[0]} into {empty_hub / 'checkpoints'}" in msg
    assert bb.weights_message in msg


def test_missing_weight_path_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        Backbone("resnet18", weights=tmp_path / "nope.pth")


def test_local_and_cached_imagenet_weights_are_used(tmp_path, empty_hub):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    state = ref.state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    bb = Backbone("resnet18", weights=path)
    assert bb.weights_source == str(path)
    torch.testing.assert_close(bb.trunk[0].weight, adapt_input_conv(4, state["conv1.weight"]))
    torch.testing.assert_close(bb.trunk[4][0].conv1.weight, state["layer1.0.conv1.weight"])
    # the same file in the hub cache under its torchvision name is found by "imagenet"
    ck = empty_hub / "checkpoints"
    ck.mkdir()
    torch.save(state, ck / imagenet_weight_candidates("resnet18")[0])
    bb2 = Backbone("resnet18", weights="imagenet")
    torch.testing.assert_close(bb2.trunk[4][0].conv1.weight, state["layer1.0.conv1.weight"])
    # weights of another architecture are refused with a message
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "mb.pth")
    with pytest.raises(WeightsNotFoundError, match="does not hold resnet18 weights"):
        Backbone("resnet18", weights=tmp_path / "mb.pth")


def test_cpm_shapes_and_gradients():
    cpm = ClassPerceptionModule(16, 5)
    x = torch.rand(2, 16, 4, 4, requires_grad=True)
    t, m = cpm(x)
    assert t.shape == (2, 5, 16) and m.shape == (2, 5, 4, 4)
    torch.testing.assert_close(m.sum(dim=(2, 3)), torch.ones(2, 5))
    # t_c = sum_ij M_ij x_ij
    torch.testing.assert_close(t[1, 3], (m[1, 3][None] * x[1]).sum(dim=(1, 2)))
    t.sum().backward()
    assert x.grad is not None and cpm.conv.weight.grad is not None and cpm.conv.weight.grad.abs().sum() > 0
    t2, m2 = ClassPerceptionModule(16, 5, norm="softmax")(x)
    torch.testing.assert_close(m2.sum(dim=(2, 3)), torch.ones(2, 5))


def test_adjacency_equals_hand_computed():
    # 5 images, 3 classes
    y = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0]])
    # N = [4, 3, 1]; B01 = 2, B02 = 1, B12 = 1
    # P01 = 2/4 = .5 > .3 -> 1; P02 = 1/4 = .25 -> 0; P10 = 2/3 -> 1; P12 = 1/3 = .333 -> 1;
    # P20 = 1/1 -> 1; P21 = 1 -> 1
    z = cooccurrence_adjacency(y, tau=0.3)
    np.testing.assert_array_equal(z, [[0, 1, 0], [1, 0, 1], [1, 1, 0]])
    a = z + np.eye(3)  # rows sums: 2, 3, 3
    d = np.array([2, 3, 3]) ** -0.5
    expected = np.array([[a[i, j] * d[i] * d[j] for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(label_adjacency(y, tau=0.3), expected, rtol=1e-6)
    np.testing.assert_allclose(normalize_adjacency(z), expected, rtol=1e-6)
    # a class that never occurs has only its self-loop
    y2 = np.c_[y, np.zeros(5)]
    a2 = label_adjacency(y2)
    assert a2[3, 3] == pytest.approx(1.0) and a2[3, :3].sum() == 0 and a2[:3, 3].sum() == 0


def test_label_vectors_shipped():
    v = load_label_vectors()
    assert v.shape == (N_CLASSES, 50) and np.isfinite(v).all()
    assert len({tuple(np.round(r, 5)) for r in v}) == N_CLASSES  # all different


def test_gcn_shapes_and_gradients():
    gc = GraphConvolution(50, 8)
    x = torch.rand(19, 50)
    adj = torch.eye(19)
    assert gc(x, adj).shape == (19, 8)
    gcn = LabelGCN(load_label_vectors(), np.eye(19), out_features=32, hidden=16)
    out = gcn()
    assert out.shape == (19, 32)
    out.pow(2).sum().backward()
    assert gcn.gc1.weight.grad.abs().sum() > 0 and gcn.gc2.weight.grad.abs().sum() > 0
    assert "adjacency" in gcn.state_dict() and "word_vectors" in gcn.state_dict()
    with pytest.raises(ValueError):
        LabelGCN(load_label_vectors(), np.eye(3), out_features=4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_model_variants(variant):
    cfg = ImageModelConfig(backbone="resnet18", variant=variant, imagenet_weights=None, gcn_hidden=32)
    labels = np.random.default_rng(0).integers(0, 2, size=(20, N_CLASSES))
    model = build_image_model(cfg, label_matrix=labels)
    x = torch.rand(2, 4, 64, 64)
    logits, cams = model(x)
    assert logits.shape == (2, N_CLASSES) and cams.shape == (2, N_CLASSES, 2, 2)
    assert (cams >= 0).all()
    (logits.sum() + cams.sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert model.backbone.trunk[0].weight.grad.abs().sum() > 0
    if variant in ("cpgcn", "mlgcn"):
        torch.testing.assert_close(model.gcn.adjacency, torch.from_numpy(label_adjacency(labels, 0.3)))
        assert "gcn.adjacency" in model.state_dict()
    n = normalize_cams(cams)
    assert float(n.detach().max()) <= 1.0 + 1e-6


def test_cpgcn_logit_is_inner_product_of_t_and_l():
    cfg = ImageModelConfig(backbone="resnet18", variant="cpgcn", imagenet_weights=None, gcn_hidden=16)
    model = build_image_model(cfg, label_matrix=np.eye(N_CLASSES)).eval()
    x = torch.rand(1, 4, 64, 64)
    with torch.no_grad():
        f = model.forward_features(x)
        logits, m = model.forward_head(f)
        t, _ = model.cpm(f)
        ll = torch.nn.functional.normalize(model.gcn(), dim=1) * model.gcn_log_scale.exp()
        expected = (t[0] * ll).sum(-1) + model.class_bias
    torch.testing.assert_close(logits[0], expected)
    raw = build_image_model(cfg.replace(gcn_normalize=False), label_matrix=np.eye(N_CLASSES))
    assert not hasattr(raw, "gcn_log_scale")
    centred = build_image_model(cfg.replace(gcn_center=True), label_matrix=np.eye(N_CLASSES))
    with torch.no_grad():
        raw_l = centred.gcn()
        expected_l = torch.nn.functional.normalize(raw_l - raw_l.mean(0), dim=1) * centred.gcn_log_scale.exp()
        torch.testing.assert_close(centred.classifiers(), expected_l)


def test_gcn_learnable_inputs():
    v = load_label_vectors()
    fixed = LabelGCN(v, np.eye(19), out_features=8, hidden=4)
    learn = LabelGCN(v, np.eye(19), out_features=8, hidden=4, learn_inputs=True)
    assert "word_vectors" not in dict(fixed.named_parameters())
    assert isinstance(learn.word_vectors, torch.nn.Parameter)
    torch.testing.assert_close(learn.word_vectors.detach(), torch.from_numpy(v))
    # same state-dict keys: a checkpoint of either kind loads into the other
    assert set(fixed.state_dict()) == set(learn.state_dict())
    learn.load_state_dict(fixed.state_dict(), strict=True)
    learn().pow(2).sum().backward()
    assert learn.word_vectors.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["cpgcn", "mlgcn"])
def test_gcn_residual_classifier_and_param_groups(variant):
    cfg = ImageModelConfig(backbone="resnet18", variant=variant, imagenet_weights=None, gcn_hidden=16)
    assert cfg.gcn_residual and cfg.gcn_learn_inputs  # the measured default
    # a config saved before these fields existed keeps the paper's plain classifier
    saved = cfg.to_dict()
    del saved["gcn_residual"], saved["gcn_learn_inputs"]
    old = ImageModelConfig.from_dict(saved)
    assert not old.gcn_residual and not old.gcn_learn_inputs
    torch.manual_seed(0)
    plain = build_image_model(cfg.replace(gcn_residual=False, gcn_learn_inputs=False), label_matrix=np.eye(N_CLASSES))
    torch.manual_seed(0)
    model = build_image_model(cfg.replace(gcn_residual=True, gcn_learn_inputs=True),
                              label_matrix=np.eye(N_CLASSES))
    assert model.class_residual.shape == (N_CLASSES, model.backbone.out_channels)
    with torch.no_grad():
        # r_c starts at zero: the same classifiers as the plain GCN at initialisation
        torch.testing.assert_close(model.classifiers(), plain.classifiers())
        model.class_residual.add_(1.0)
        torch.testing.assert_close(model.classifiers(), plain.classifiers() + 1.0)
    logits, cams = model(torch.rand(2, 4, 64, 64))
    (logits.sum() + cams.sum()).backward()
    assert model.class_residual.grad.abs().sum() > 0 and model.gcn.word_vectors.grad.abs().sum() > 0
    # node inputs train at the full lr, the GCN weights at lr * gcn_lr_scale
    groups = model.param_groups(1e-3)
    full = {id(p) for g in groups if g["lr"] == 1e-3 for p in g["params"]}
    slow = {id(p) for g in groups if g["lr"] < 1e-3 for p in g["params"]}
    assert id(model.gcn.word_vectors) in full and id(model.class_residual) in full
    assert id(model.gcn.gc1.weight) in slow and id(model.gcn.gc2.weight) in slow
    # a checkpoint of the plain model has no r_c: loading it into a residual model is refused
    with pytest.raises(RuntimeError, match="class_residual"):
        model.load_state_dict(plain.state_dict(), strict=True)
    # r_c started like the cnn+cpm classifier: std 1/sqrt(D)
    rand = build_image_model(cfg.replace(gcn_residual=True, gcn_residual_std=1.0), label_matrix=np.eye(N_CLASSES))
    d = rand.backbone.out_channels
    assert abs(float(rand.class_residual.detach().std()) * d ** 0.5 - 1.0) < 0.1
    from napari_cpgcn.training.config import ConfigError

    with pytest.raises(ConfigError, match="gcn_residual_std"):
        cfg.replace(gcn_residual_std=-1.0)


def test_unknown_backbone_and_variant():
    with pytest.raises(ValueError, match="unknown backbone"):
        Backbone("vgg16")
    from napari_cpgcn.training.config import ConfigError

    with pytest.raises(ConfigError, match="variant"):
        ImageModelConfig(variant="foo").validate()
