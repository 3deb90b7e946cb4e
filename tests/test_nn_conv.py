"""fastconv.nn conv modules are drop-in for torch's: constructor, parameters, init, state_dict, convert."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastconv
from helpers import assert_close


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_module_matches_torch_module(padding_mode):
    kwargs = dict(stride=(1, 2), padding=(2, 1), dilation=(1, 2), groups=2, bias=True, padding_mode=padding_mode,
                  dtype=torch.float64)
    torch.manual_seed(1)
    ref = nn.Conv2d(4, 6, (3, 2), **kwargs)
    torch.manual_seed(1)
    ours = fastconv.nn.Conv2d(4, 6, (3, 2), **kwargs)
    # Same initialisation (same RNG draws), same parameter names and shapes.
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64, requires_grad=True)
    assert_close(ours(x), ref(x))
    torch.autograd.gradcheck(ours, (x,), fast_mode=True)


@pytest.mark.parametrize("ndim", [1, 3])
def test_conv1d_conv3d_modules(ndim):
    cls, ref_cls = getattr(fastconv.nn, f"Conv{ndim}d"), getattr(nn, f"Conv{ndim}d")
    torch.manual_seed(2)
    ref = ref_cls(3, 4, 3, padding="same", padding_mode="reflect", dtype=torch.float64)
    torch.manual_seed(2)
    ours = cls(3, 4, 3, padding="same", padding_mode="reflect", dtype=torch.float64)
    x = torch.randn(2, 3, *([6] * ndim), dtype=torch.float64)
    assert_close(ours(x), ref(x))


def test_state_dict_round_trips_with_torch_and_repr_matches():
    ours = fastconv.nn.Conv2d(3, 8, 5, stride=2, padding=1, bias=False)
    ref = nn.Conv2d(3, 8, 5, stride=2, padding=1, bias=False)
    ref.load_state_dict(ours.state_dict())
    ours2 = fastconv.nn.Conv2d(3, 8, 5, stride=2, padding=1, bias=False)
    ours2.load_state_dict(ref.state_dict())
    assert torch.equal(ours2.weight, ours.weight)
    assert repr(ours) == repr(ref)
    assert "algo='im2col'" in repr(fastconv.nn.Conv2d(3, 8, 5, algo="im2col"))
    assert isinstance(ours, nn.Conv2d)


def _small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=1, padding_mode="reflect"), nn.ReLU()),
        nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    ).double()


def test_convert_swaps_every_conv_and_keeps_weights_and_outputs():
    net = _small_net()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    before = net(x)
    weights = [p for p in net.parameters()]
    out = fastconv.convert(net)
    assert out is net
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(isinstance(m, fastconv.nn.Conv2d) for m in convs)
    assert all(a is b for a, b in zip(net.parameters(), weights)), "parameters must be the same objects"
    assert_close(net(x), before)
    # Converting twice changes nothing; a bare layer converts too.
    fastconv.convert(net)
    assert isinstance(fastconv.convert(nn.Conv2d(2, 2, 3)), fastconv.nn.Conv2d)
    fastconv.convert(net, algo="direct")
    assert [m.algo for m in convs] == ["direct"] * 3
    assert_close(net(x), before)


def test_converted_model_trains_like_torch():
    torch.manual_seed(0)
    ref = _small_net()
    ours = fastconv.convert(_small_net())
    ours.load_state_dict(ref.state_dict())
    x, y = torch.randn(4, 3, 10, 10, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    for model in (ref, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert_close(a, b)


class _ConstructionOnlyConv3d(nn.Conv3d):
    """Like torchvision's Conv3DSimple: an nn.Conv3d with its own constructor, torch's forward."""

    def __init__(self, in_planes, out_planes, stride=1):
        super().__init__(in_planes, out_planes, kernel_size=(3, 3, 3), stride=stride, padding=1, bias=False)


class _OwnForwardConv2d(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_convert_handles_subclasses_of_torch_layers():
    torch.manual_seed(0)
    net = nn.Sequential(_ConstructionOnlyConv3d(2, 4), nn.ReLU(), nn.Flatten(2), nn.Unflatten(2, (4, 16)),
                        _OwnForwardConv2d(4, 4, 3)).double()
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    expected = net(x)
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\).*4: _OwnForwardConv2d subclasses "
                                         r"torch.nn.modules.conv.Conv2d and overrides forward"):
        fastconv.convert(net)
    assert isinstance(net[0], fastconv.nn.Conv3d)  # construction-only subclass: converted
    assert type(net[4]) is _OwnForwardConv2d  # its own forward: left alone, and said so
    assert_close(net(x), expected)
