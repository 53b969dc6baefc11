"""Tests for cxrbench.models.classifier and cxrbench.models.weights (tiny inputs, no downloads)."""

from __future__ import annotations

import contextlib
import re
import sys
import time

import pytest
import torch
import torchvision
from torch import nn

import cxrbench.models as models_pkg
from cxrbench.models.classifier import (
    DenseNet121,
    ResNet18,
    build_classifier,
    classifier_layer,
    disable_inplace_relu,
    embed,
    feature_layer,
    from_torchxrayvision,
    inplace_relus,
)
from cxrbench.models.weights import (
    WeightsUnavailableError,
    adapt_conv_weight,
    load_chexnet_checkpoint,
    torchvision_weights_path,
)

TORCHVISION_FACTORY = {"densenet121": torchvision.models.densenet121, "resnet18": torchvision.models.resnet18}
FEATURE_DIM = {"densenet121": 1024, "resnet18": 512}



def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm non-trivial running stats and affine params so weight-loading checks can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def _to_old_chexnet_format(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision DenseNet keys -> arnoweng/CheXNet keys (DataParallel, densenet121., norm.1, classifier.0)."""
    old = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue  # PyTorch 0.3 checkpoints have none
        key = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)
        key = key.replace("classifier.", "classifier.0.")
        old[f"module.densenet121.{key}"] = value
    return old


@pytest.mark.parametrize("arch", ["densenet121", "resnet18"])
def test_build_classifier_shapes_and_attributes(arch: str) -> None:
    torch.manual_seed(0)
    model = build_classifier(arch, num_outputs=14, in_channels=1).eval()
    x = torch.rand(2, 1, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 14) and logits.dtype == torch.float32
    assert (model.arch, model.in_channels, model.num_outputs) == (arch, 1, 14)
    assert model.pretrained_weights is None
    emb = embed(model, x)
    assert emb.shape == (2, FEATURE_DIM[arch])
    head = classifier_layer(model)
    assert isinstance(head, nn.Linear) and head.in_features == FEATURE_DIM[arch] and head.out_features == 14
    torch.testing.assert_close(head(emb), logits)  # logits = head(pooled features)
    expected_feature = model.features if arch == "densenet121" else model.layer4
    assert feature_layer(model) is expected_feature
    # wrapped models (DataParallel-style .module) are unwrapped
    wrapper = nn.Module()
    wrapper.module = model
    assert feature_layer(wrapper) is expected_feature


@pytest.mark.parametrize("arch", ["densenet121", "resnet18"])
def test_state_dict_is_torchvision_compatible_and_forward_matches(arch: str) -> None:
    torch.manual_seed(1)
    reference = _randomise_batchnorm(TORCHVISION_FACTORY[arch](num_classes=5)).eval()
    ours = build_classifier(arch, num_outputs=5, in_channels=3).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))


@pytest.mark.parametrize("arch", ["densenet121", "resnet18"])
def test_no_inplace_relu_and_backward_hooks_work(arch: str) -> None:
    torch.manual_seed(2)
    model = build_classifier(arch, num_outputs=3, in_channels=1).eval()
    assert not any(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    grads: dict[str, torch.Tensor] = {}

    def keep_grad(module: nn.Module, grad_in: tuple, grad_out: tuple) -> None:
        grads["g"] = grad_out[0]

    handle = feature_layer(model).register_full_backward_hook(keep_grad)
    x = torch.rand(1, 1, 64, 64, requires_grad=True)
    model(x)[0, 1].backward()
    handle.remove()
    assert grads["g"].shape[1] == FEATURE_DIM[arch]
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_torchvision_densenet_breaks_backward_hooks_which_is_why_we_wrap() -> None:
    torch.manual_seed(3)
    reference = torchvision.models.densenet121(num_classes=2).eval()
    reference.features.register_full_backward_hook(lambda *args: None)
    with pytest.raises(RuntimeError, match="inplace"):
        reference(torch.rand(1, 3, 32, 32)).sum().backward()


def _relu_flags(model: nn.Module) -> list[bool]:
    return [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]


@pytest.mark.parametrize("arch", ["densenet121", "resnet18"])
def test_inplace_relus_give_the_same_bits_in_the_forward_the_input_gradient_and_a_training_step(arch) -> None:
    torch.manual_seed(4)
    model = _randomise_batchnorm(build_classifier(arch, num_outputs=5, in_channels=1))
    twin = build_classifier(arch, num_outputs=5, in_channels=1)
    twin.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 64, 64)

    def step(net: nn.Module, fast: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        image = x.clone().requires_grad_(True)
        net.zero_grad(set_to_none=True)
        with inplace_relus(net) if fast else contextlib.nullcontext():
            if fast:  # they really run in place inside, and only there
                assert all(_relu_flags(net))
            logits = net(image)
            logits[:, [1, 3]].sum().backward()
        return logits.detach(), image.grad, [p.grad for p in net.parameters()]

    for training in (False, True):  # eval: logits and saliency; train: batch statistics and weight gradients
        model.train(training), twin.train(training)
        (a_logits, a_image, a_params), (b_logits, b_image, b_params) = step(model, False), step(twin, True)
        assert torch.equal(a_logits, b_logits) and torch.equal(a_image, b_image)
        assert all(torch.equal(a, b) for a, b in zip(a_params, b_params))
        assert not any(_relu_flags(twin))  # restored
    # the running statistics the training forwards updated are the same too
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), twin.buffers()))


def test_inplace_relus_leave_hooked_and_foreign_models_alone_and_restore_after_errors() -> None:
    torch.manual_seed(5)
    model = build_classifier("resnet18", num_outputs=2, in_channels=1).eval()
    seen: list[torch.Tensor] = []
    handle = model.bn1.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad(), inplace_relus(model):
        assert not any(_relu_flags(model))  # a hook may keep a tensor a ReLU would overwrite: left as it is
        model(torch.rand(1, 1, 64, 64))
    assert (seen[0] < 0).any()  # the batch norm's output the hook kept was not rectified afterwards
    handle.remove()
    foreign = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with inplace_relus(foreign):
        assert not any(_relu_flags(foreign))
    with pytest.raises(ZeroDivisionError), inplace_relus(model):
        assert all(_relu_flags(model))
        1 / 0  # noqa: B018
    assert not any(_relu_flags(model))


def test_disable_inplace_relu_on_any_module() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Sequential(nn.ReLU(inplace=True)))
    assert disable_inplace_relu(net) is net
    assert [m.inplace for m in net.modules() if isinstance(m, nn.ReLU)] == [False, False]


def test_dropout_adds_no_state_dict_keys_and_is_active_only_in_training() -> None:
    torch.manual_seed(4)
    plain = build_classifier("resnet18", num_outputs=4)
    dropped = build_classifier("resnet18", num_outputs=4, dropout=0.5)
    assert list(plain.state_dict()) == list(dropped.state_dict())
    dropped.load_state_dict(plain.state_dict())
    x = torch.rand(4, 1, 32, 32)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped(x), plain(x))
        dropped.train()
        assert not torch.allclose(dropped(x), dropped(x))


def test_one_channel_conv_is_rgb_sum_and_matches_grey_input() -> None:
    torch.manual_seed(5)
    rgb = _randomise_batchnorm(build_classifier("resnet18", num_outputs=3, in_channels=3)).eval()
    grey = build_classifier("resnet18", num_outputs=3, in_channels=1).eval()
    state = rgb.state_dict()
    state["conv1.weight"] = adapt_conv_weight(state["conv1.weight"], 1)
    torch.testing.assert_close(state["conv1.weight"], rgb.conv1.weight.sum(dim=1, keepdim=True))
    grey.load_state_dict(state)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    assert adapt_conv_weight(torch.ones(2, 1, 3, 3), 3).sum() == pytest.approx(18.0)


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        build_classifier("vgg16")
    with pytest.raises(ValueError, match="dropout"):
        build_classifier("resnet18", dropout=1.0)
    model = build_classifier("resnet18", num_outputs=2, in_channels=1)
    with pytest.raises(ValueError, match=r"expects input \(B, 1, H, W\)"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(TypeError, match="not a cxrbench classifier"):
        feature_layer(nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ["densenet121", "resnet18"])
def test_pretrained_offline_fails_fast_without_downloading(arch, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    expected = torchvision_weights_path(arch)
    assert expected.parent == tmp_path / "hub" / "checkpoints"
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        build_classifier(arch, pretrained=True)
    assert time.perf_counter() - start < 10.0
    message = str(info.value)
    assert str(expected) in message and "IMAGENET1K_V1" in message and "allow_download" in message
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("arch", ["densenet121", "resnet18"])
def test_pretrained_loads_from_hub_cache(arch, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(6)
    fake = _randomise_batchnorm(TORCHVISION_FACTORY[arch]())  # 1000-class ImageNet shape
    state = fake.state_dict()
    if arch == "densenet121":  # torchvision's real densenet files use the old 'norm.1' keys
        state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
    path = torchvision_weights_path(arch)
    path.parent.mkdir(parents=True)
    torch.save(state, path)

    model = build_classifier(arch, num_outputs=14, in_channels=1, pretrained=True)
    assert model.pretrained_weights.endswith("IMAGENET1K_V1")
    conv_name = "features.conv0" if arch == "densenet121" else "conv1"
    torch.testing.assert_close(
        model.get_submodule(conv_name).weight, fake.get_submodule(conv_name).weight.sum(dim=1, keepdim=True)
    )
    ours, theirs = model.state_dict(), fake.state_dict()
    deep_keys = [k for k in theirs if "running_var" in k][-3:]
    for key in deep_keys:
        torch.testing.assert_close(ours[key], theirs[key])
    assert classifier_layer(model).out_features == 14  # head not taken from the 1000-class file
    assert not any(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_allow_download_fetches_into_hub_cache_with_hash_check(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(9)
    fake_state = torchvision.models.resnet18().state_dict()
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):  # stands in for the network
        calls.append((url, hash_prefix))
        torch.save(fake_state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = build_classifier("resnet18", num_outputs=2, pretrained=True, allow_download=True)
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd")]
    assert torchvision_weights_path("resnet18").is_file()
    torch.testing.assert_close(model.layer1[0].conv1.weight, fake_state["layer1.0.conv1.weight"])


def test_load_chexnet_checkpoint_old_format_reproduces_outputs(tmp_path) -> None:
    torch.manual_seed(7)
    reference = _randomise_batchnorm(torchvision.models.densenet121(num_classes=14)).eval()
    old_state = _to_old_chexnet_format(reference.state_dict())
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in old_state
    assert "module.densenet121.classifier.0.weight" in old_state
    path = tmp_path / "model.pth.tar"
    torch.save({"epoch": 7, "arch": "densenet121", "state_dict": old_state}, path)

    model = load_chexnet_checkpoint(build_classifier("densenet121", num_outputs=14, in_channels=3), path).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(model(x)), torch.sigmoid(reference(x)))
        # a 1-channel model gets the RGB-summed first conv: same output on grey input
        grey = load_chexnet_checkpoint(build_classifier("densenet121", in_channels=1), {"state_dict": old_state})
        grey_x = x[:, :1]
        torch.testing.assert_close(grey.eval()(grey_x), reference(grey_x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


def test_load_chexnet_checkpoint_reports_mismatched_keys() -> None:
    torch.manual_seed(8)
    model = build_classifier("densenet121", num_outputs=14, in_channels=3)
    old_state = _to_old_chexnet_format(model.state_dict())
    del old_state["module.densenet121.features.norm5.weight"]
    old_state["module.densenet121.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys.*features\.norm5\.weight.*unexpected keys.*extra\.weight"):
        load_chexnet_checkpoint(model, old_state)
    wrong_head = _to_old_chexnet_format(build_classifier("densenet121", num_outputs=3, in_channels=3).state_dict())
    with pytest.raises(ValueError, match=r"shape mismatch.*classifier\.weight"):
        load_chexnet_checkpoint(model, wrong_head)


class _NotATensor:
    pass


def test_load_chexnet_checkpoint_never_unpickles_objects(tmp_path) -> None:
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": _NotATensor()}, path)
    model = build_classifier("resnet18", num_outputs=2)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_chexnet_checkpoint(model, path)
    with pytest.raises(FileNotFoundError):
        load_chexnet_checkpoint(model, tmp_path / "missing.pth.tar")


def test_from_torchxrayvision_without_package_raises_clear_import_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)  # import fails even where installed
    with pytest.raises(ImportError, match="pip install torchxrayvision"):
        from_torchxrayvision("densenet121-res224-nih")


def test_models_package_reexports_lazily() -> None:
    assert models_pkg.build_classifier is build_classifier
    assert models_pkg.DenseNet121 is DenseNet121 and models_pkg.ResNet18 is ResNet18
    assert "load_chexnet_checkpoint" in dir(models_pkg)
    with pytest.raises(AttributeError):
        models_pkg.no_such_name  # noqa: B018
