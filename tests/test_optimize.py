"""``fastconv.optimize``: BatchNorm folded into the preceding conv, outputs equal to the unfused model's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastconv
from helpers import assert_close


def _randomise_bn(model):
    # Fresh BNs are the identity; give them statistics and affine parameters worth folding.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


@pytest.mark.parametrize("converted", [False, True], ids=["torch_layers", "fastconv_layers"])
def test_resnet_batchnorms_fold_and_outputs_match(converted):
    model = _randomise_bn(fastconv.nn.to_torch(fastconv.models.resnet18())).double().eval()
    if converted:
        fastconv.convert(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = model(x)
    fast = fastconv.optimize(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert fast.folded_batchnorms == n_bn == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert_close(fast(x), expected)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_batchnorm_whose_conv_output_is_shared_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # y is read twice: folding would change the second use

    model = _randomise_bn(Shared()).double().eval()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    fast = fastconv.optimize(model)
    assert fast.folded_batchnorms == 0
    assert_close(fast(x), model(x))


def test_float32_within_tolerance_and_eval_mode():
    model = _randomise_bn(nn.Sequential(fastconv.nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                        nn.ReLU()))
    model.train()
    fast = fastconv.optimize(model)
    assert not fast.training and fast.folded_batchnorms == 1
    x = torch.randn(2, 3, 10, 10)
    assert_close(fast(x), model.eval()(x))
