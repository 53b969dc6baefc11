"""Tests of cxrbench.explain explainers: contract, hook hygiene, and numerical references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cxrbench.explain import (
    CAM,
    EXPLAINERS,
    ChesterSaliency,
    GradCAM,
    IntegratedGradients,
    SmoothGrad,
    get_explainer,
    mask_fraction,
)
from cxrbench.explain.base import _resolve_layers, minmax_normalize, resize_maps, target_matrix

FAST_OPTIONS = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 3}}
SIZE = 64  # ResNet18: 2x2 final features; the small DenseNet: 8x8


def small_densenet(in_channels: int) -> nn.Module:
    """torchvision's DenseNet class (same forward, in-place ReLUs) at a reduced depth and width."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(
        growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=14
    )
    model.features.conv0 = nn.Conv2d(in_channels, 16, 7, 2, 3, bias=False)
    return model.eval()


def resnet18(in_channels: int) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=14)
    model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model.eval()


MODEL_BUILDERS = {"densenet": small_densenet, "resnet18": resnet18}
_MODEL_CACHE: dict[tuple[str, int], nn.Module] = {}


def get_model(arch: str, in_channels: int) -> nn.Module:
    key = (arch, in_channels)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = MODEL_BUILDERS[arch](in_channels)
    return _MODEL_CACHE[key]


def batch(in_channels: int, size: int = SIZE, n: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, in_channels, size, size, generator=generator)


def assert_no_hooks(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks and not getattr(module, "_backward_pre_hooks", {})


def inplace_flags(model: nn.Module) -> list[bool]:
    return [m.inplace for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)]


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("arch", ["densenet", "resnet18"])
@pytest.mark.parametrize("name", EXPLAINERS)
def test_explainer_contract(name: str, arch: str, in_channels: int) -> None:
    model = get_model(arch, in_channels)
    x = batch(in_channels)
    explainer = get_explainer(name, model, **FAST_OPTIONS.get(name, {}))
    reference = explainer(x, targets=[0, 3])  # model in eval mode

    model.train()
    flags_before = inplace_flags(model)
    assert any(flags_before), "test models must contain in-place ReLUs"
    requires_grad_before = [p.requires_grad for p in model.parameters()]
    maps = explainer(x, targets=[0, 3])

    expected_f = 1 if name == "saliency" else 2
    assert maps.shape == (2, expected_f, SIZE, SIZE)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert np.abs(maps).max() > 0, "maps must not be all zero for a random model"
    np.testing.assert_allclose(maps, reference, rtol=1e-4, atol=1e-7)  # explained in eval mode
    assert all(m.training for m in model.modules()), "train mode must be restored"
    model.eval()
    assert inplace_flags(model) == flags_before
    assert [p.requires_grad for p in model.parameters()] == requires_grad_before
    assert all(p.grad is None for p in model.parameters())
    assert_no_hooks(model)


@pytest.mark.parametrize("name", ["cam", "gradcam", "saliency_per_finding", "integrated_gradients"])
def test_targets_all_and_per_image(name: str) -> None:
    model = get_model("resnet18", 1)
    x = batch(1, size=32)
    explainer = get_explainer(name, model, **FAST_OPTIONS.get(name, {}))
    all_maps = explainer(x)
    assert all_maps.shape == (2, 14, 32, 32)
    subset = explainer(x, targets=[5, 2])
    np.testing.assert_allclose(subset, all_maps[:, [5, 2]], rtol=1e-4, atol=1e-7)
    per_image = explainer(x, targets=[[1], [7]])
    np.testing.assert_allclose(per_image[0, 0], all_maps[0, 1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(per_image[1, 0], all_maps[1, 7], rtol=1e-4, atol=1e-7)


def test_target_validation() -> None:
    assert target_matrix(None, 2, 3).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert target_matrix([[0, 2], [1, 1]], 2, 3).tolist() == [[0, 2], [1, 1]]
    with pytest.raises(ValueError, match="out of range"):
        target_matrix([3], 2, 3)
    with pytest.raises(ValueError, match="equal length"):
        target_matrix([[0], [1, 2]], 2, 3)
    with pytest.raises(ValueError, match="2 lists for a batch of 3"):
        target_matrix([[0], [1]], 3, 3)
    with pytest.raises(TypeError):
        target_matrix(["Effusion"], 1, 3)
    with pytest.raises(ValueError, match="empty"):
        target_matrix([], 1, 3)


@pytest.mark.parametrize("name", ["cam", "gradcam", "saliency"])
def test_hooks_released_and_state_restored_on_exception(name: str) -> None:
    model = get_model("resnet18", 1)
    model.train()
    flags_before = inplace_flags(model)
    explainer = get_explainer(name, model)
    with pytest.raises(ValueError, match="out of range"):  # raised after the forward pass
        explainer(batch(1), targets=[14])
    assert not model.layer4._forward_hooks and not model.layer4._backward_hooks

    def fail(*_args: object) -> None:
        raise RuntimeError("boom in the head")

    handle = model.fc.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            explainer(batch(1), targets=[0])
    finally:
        handle.remove()
    assert_no_hooks(model)
    assert all(m.training for m in model.modules())
    assert inplace_flags(model) == flags_before
    model.eval()


def test_gradcam_densenet_matches_manual_reference() -> None:
    """Real densenet121 (in-place F.relu in forward): Grad-CAM equals a by-hand autograd reference."""
    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None, num_classes=14)
    model.features.conv0 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    model.eval()
    x = batch(1, size=64)
    maps = GradCAM(model)(x, targets=[2, 9])

    features = model.features(x)
    logits = model.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(features), 1), 1))
    torch.testing.assert_close(logits, model(x))
    expected = []
    for c in (2, 9):
        (grad,) = torch.autograd.grad(logits[:, c].sum(), features, retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * features).sum(1, keepdim=True))
        expected.append(F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False))
    expected_maps = torch.cat(expected, dim=1).detach().numpy()
    assert expected_maps.max() > 0
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-4, atol=1e-6)


def test_cam_equals_gradcam_up_to_positive_scale_for_gap_linear_head() -> None:
    model = get_model("resnet18", 1)
    x = batch(1, size=96)  # 3x3 feature maps
    targets = [0, 4, 11]
    cam = CAM(model)
    raw_cam = F.relu(cam._compute(x, targets))
    gradcam = GradCAM(model)
    # dy/dA_ij = w / Z for GAP + linear, so Grad-CAM = ReLU(CAM) / Z with Z = 3 * 3.
    assert raw_cam.max() > 0
    torch.testing.assert_close(gradcam._compute(x, targets), raw_cam / 9.0, rtol=1e-4, atol=1e-7)
    # Both upsample bilinearly; CAM's map itself keeps its negative part unless relu=True.
    expected = resize_maps(raw_cam, (96, 96)) / 9.0
    np.testing.assert_allclose(gradcam(x, targets), expected, rtol=1e-4, atol=1e-7)
    cam_maps = CAM(model)(x, targets)
    np.testing.assert_allclose(cam_maps, resize_maps(cam._compute(x, targets), (96, 96)), atol=1e-6)
    assert cam_maps.min() < 0


def test_cam_spatial_mean_is_logit_minus_bias() -> None:
    model = get_model("resnet18", 1)
    x = batch(1, size=64)
    explainer = CAM(model)
    with torch.no_grad():
        logits = model(x)
    raw = explainer._compute(x, [3])  # (B, 1, 2, 2) before upsampling
    torch.testing.assert_close(raw.mean(dim=(2, 3))[:, 0], logits[:, 3] - model.fc.bias[3])


@pytest.mark.parametrize("in_channels", [1, 3])
def test_chester_saliency_equals_autograd(in_channels: int) -> None:
    model = get_model("densenet", in_channels)
    x = batch(in_channels)
    targets = [0, 6, 13]
    summed = ChesterSaliency(model)(x, targets=targets)
    per_finding = ChesterSaliency(model, per_finding=True)(x, targets=targets)

    image = x.clone().requires_grad_(True)
    logits = model(image)
    (grad,) = torch.autograd.grad(logits[:, targets].sum(), image)
    expected = grad.sum(1, keepdim=True).clamp_min(0).numpy()
    assert expected.max() > 0
    np.testing.assert_allclose(summed, expected, rtol=1e-5, atol=1e-9)
    for j, c in enumerate(targets):
        (grad_c,) = torch.autograd.grad(model(image)[:, c].sum(), image)
        np.testing.assert_allclose(
            per_finding[:, j], grad_c.sum(1).clamp_min(0).numpy(), rtol=1e-5, atol=1e-9
        )


@pytest.mark.parametrize("name", ["saliency", "saliency_per_finding", "integrated_gradients", "smoothgrad", "gradcam"])
def test_input_gradient_methods_run_cxrbench_classifiers_with_inplace_relus_and_the_same_maps(name: str) -> None:
    """Saliency, IG and SmoothGrad need no hook, so a cxrbench classifier runs with in-place ReLUs (fewer
    tensors) and gives the maps of the same network with hooks on it (which keeps every ReLU out of place);
    Grad-CAM hooks a layer and keeps them out of place."""
    from cxrbench.models.classifier import build_classifier

    torch.manual_seed(6)
    model = build_classifier("resnet18", num_outputs=4, in_channels=1).eval()
    flags: list[bool] = []
    forward = model.forward

    def spy(x: torch.Tensor) -> torch.Tensor:
        flags.append(all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU)))
        return forward(x)

    model.forward = spy  # type: ignore[method-assign]
    x = torch.rand(2, 1, SIZE, SIZE)
    options = FAST_OPTIONS.get(name, {})
    logits, fast = get_explainer(name, model, **options).explain_with_logits(x, targets=[0, 2])
    assert flags and all(flags) == (name != "gradcam") and not any(inplace_flags(model))
    handle = model.conv1.register_forward_hook(lambda *_args: None)  # a hook: the ReLUs stay out of place
    flags.clear()
    hooked_logits, reference = get_explainer(name, model, **options).explain_with_logits(x, targets=[0, 2])
    handle.remove()
    assert flags and not any(flags)
    assert np.array_equal(logits, hooked_logits) and np.array_equal(fast, reference) and fast.max() > 0


class QuadrantNet(nn.Module):
    """Outputs depend only on the top-left quadrant of the input (the rest is masked to zero)."""

    def __init__(self, in_channels: int = 1, num_outputs: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 1, bias=False),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(8, num_outputs)
        with torch.no_grad():
            for module in (self.features[0], self.features[3], self.fc):
                module.weight.abs_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        keep = torch.zeros_like(x)
        keep[..., : height // 2, : width // 2] = 1.0
        return self.fc(self.features(x * keep).mean(dim=(2, 3)))


@pytest.mark.parametrize("name", EXPLAINERS)
def test_maps_concentrate_where_the_model_looks(name: str) -> None:
    model = QuadrantNet().eval()
    x = batch(1, size=64) + 0.1
    maps = get_explainer(name, model, **FAST_OPTIONS.get(name, {}))(x, targets=[0, 2])
    quadrant = np.zeros((64, 64), dtype=np.float32)
    quadrant[:32, :32] = 1.0
    fractions = np.atleast_1d(mask_fraction(maps, quadrant))
    assert np.all(fractions > 0.9), fractions


def test_postprocessing_options() -> None:
    model = get_model("resnet18", 1)
    x = batch(1, size=96)
    raw = GradCAM(model)(x, targets=[1])
    normalized = GradCAM(model, normalize="minmax")(x, targets=[1])
    assert normalized.min() == 0.0 and normalized.max() == pytest.approx(1.0)
    np.testing.assert_allclose(normalized, minmax_normalize(raw), atol=1e-6)
    smooth = GradCAM(model, sigma=3.0)(x, targets=[1])
    assert smooth.max() < raw.max()
    assert np.abs(np.diff(smooth, axis=-1)).mean() < np.abs(np.diff(raw, axis=-1)).mean()
    cam = CAM(model)(x, targets=[1])
    assert CAM(model, relu=True)(x, targets=[1]).min() >= 0 and cam.min() < 0
    constant = minmax_normalize(np.full((1, 1, 4, 4), 3.0, dtype=np.float32))
    assert np.all(constant == 0)
    with pytest.raises(ValueError, match="normalize"):
        GradCAM(model, normalize="zscore")
    with pytest.raises(ValueError, match="sigma"):
        GradCAM(model, sigma=-1.0)


def test_frozen_model_and_no_grad_context() -> None:
    model = small_densenet(1)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = batch(1)
    with torch.no_grad():
        gradcam = GradCAM(model)(x, targets=[0])
        saliency = ChesterSaliency(model)(x, targets=[0])
    assert gradcam.max() > 0 and saliency.max() > 0
    assert not any(p.requires_grad for p in model.parameters())
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            GradCAM(model)(x, targets=[0])
        cam = CAM(model)(x, targets=torch.tensor([0]))  # forward only: fine
    assert cam.shape == (2, 1, SIZE, SIZE) and np.isfinite(cam).all()


def test_integrated_gradients_baseline() -> None:
    model = get_model("resnet18", 1)
    x = batch(1)
    same_as_input = IntegratedGradients(model, n_steps=4, baseline=x)(x, targets=[0])
    assert np.all(same_as_input == 0)
    zero = IntegratedGradients(model, n_steps=4)(x, targets=[0])
    explicit_zero = IntegratedGradients(model, n_steps=4, baseline=0.0)(x, targets=[0])
    np.testing.assert_allclose(zero, explicit_zero)
    with pytest.raises(ValueError, match="broadcast"):
        IntegratedGradients(model, baseline=torch.zeros(3, 5))(x, targets=[0])
    with pytest.raises(ValueError, match="n_steps"):
        IntegratedGradients(model, n_steps=0)


def test_smoothgrad_is_seeded_and_leaves_global_rng_alone() -> None:
    model = get_model("resnet18", 1)
    x = batch(1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = SmoothGrad(model, n_samples=3, seed=7)(x, targets=[2])
    assert torch.equal(torch.get_rng_state(), state)
    second = SmoothGrad(model, n_samples=3, seed=7)(x, targets=[2])
    other = SmoothGrad(model, n_samples=3, seed=8)(x, targets=[2])
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other)


def test_layer_resolution_and_registry_errors() -> None:
    densenet, resnet = get_model("densenet", 1), get_model("resnet18", 1)
    assert _resolve_layers(densenet) == (densenet.features, densenet.classifier)
    assert _resolve_layers(resnet) == (resnet.layer4, resnet.fc)
    assert _resolve_layers(resnet, target_layer=resnet.layer3)[0] is resnet.layer3
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="target_layer="):
        GradCAM(plain)
    with pytest.raises(ValueError, match="fc="):
        CAM(plain, target_layer=plain[0])
    maps = CAM(plain, target_layer=plain[0], fc=plain[3])(torch.rand(1, 1, 16, 16))
    assert maps.shape == (1, 2, 16, 16)
    with pytest.raises(ValueError, match="unknown explainer"):
        get_explainer("lime", resnet)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        GradCAM(resnet)(torch.rand(1, 32, 32))
    assert EXPLAINERS == [
        "saliency", "saliency_per_finding", "cam", "gradcam", "integrated_gradients", "smoothgrad"
    ]
