"""``fastconv.optimize``: BatchNorm folded into the preceding conv, conv + ReLU/ReLU6 fused into ConvBiasAct,
outputs equal to the unfused model's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
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
    # the stem's conv and each basic block's first conv feed a ReLU alone; the second conv feeds the residual
    # add (its ReLU comes after the add) and the downsample conv feeds the add: not fused
    fused = sorted(name for name, m in fast.named_modules() if isinstance(m, fastconv.nn.ConvBiasAct))
    assert fast.fused_activations == len(fused) == 9
    assert fused == ["conv1"] + [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    assert isinstance(fast.get_submodule("layer1.0.conv2"), nn.Conv2d)
    assert all(m.activation == "relu" and m.bias is not None for m in fast.modules()
               if isinstance(m, fastconv.nn.ConvBiasAct))
    assert_close(fast(x), expected)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    assert not any(isinstance(m, fastconv.nn.ConvBiasAct) for m in model.modules())
    assert fastconv.optimize(model, fuse_activations=False).fused_activations == 0


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


class ConvBnReLU(nn.Module):
    """Each way of writing a ReLU/ReLU6 after a conv (+ BN), and the patterns that must not be fused."""

    def __init__(self):
        super().__init__()
        c = lambda i, o, **kw: nn.Conv2d(i, o, 3, padding=1, **kw)  # noqa: E731
        self.c1, self.b1, self.a1 = c(3, 8, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.c2, self.b2, self.a2 = fastconv.nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()
        self.c3 = c(8, 8)                               # Tensor.relu()
        self.c4 = c(8, 8)                               # torch.relu_ (in place)
        self.c5 = c(8, 8)                               # F.hardtanh(0, 6) == relu6
        self.c6 = c(8, 8)                               # Tensor.clamp(0, 6) == relu6
        self.c7 = c(8, 8)                               # output also read by the residual add: not fused
        self.c8 = c(8, 8, padding_mode="reflect")      # padding_mode: not fused
        self.c9 = c(8, 8)                               # F.hardtanh(-1, 1): not a ReLU, not fused
        self.c10 = nn.Conv1d(8, 4, 3)                  # 1-D conv + F.relu6, then a ReLU: only the first fused
        self.a_last = nn.ReLU()

    def forward(self, x):
        x = self.a1(self.b1(self.c1(x)))
        x = self.a2(self.b2(self.c2(x)))
        x = self.c3(x).relu()
        x = torch.relu_(self.c4(x))
        x = TF.hardtanh(self.c5(x), 0.0, 6.0)
        x = self.c6(x).clamp(0, 6)
        y = self.c7(x)
        x = torch.relu(y) + y
        x = torch.relu(self.c8(x))
        x = TF.hardtanh(self.c9(x), -1.0, 1.0)
        x = TF.relu6(self.c10(x.flatten(2) * 100))  # scaled: some outputs clamp at 6
        return self.a_last(x)


@pytest.mark.parametrize("converted", [False, True], ids=["torch_layers", "fastconv_layers"])
def test_small_conv_bn_relu_net_fuses_every_plain_pattern(converted):
    model = _randomise_bn(ConvBnReLU()).eval()
    if converted:
        fastconv.convert(model)
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    fast = fastconv.optimize(model)
    assert fast.folded_batchnorms == 2
    kinds = {name: m.activation for name, m in fast.named_modules() if isinstance(m, fastconv.nn.ConvBiasAct)}
    assert kinds == {"c1": "relu", "c2": "relu6", "c3": "relu", "c4": "relu", "c5": "relu6", "c6": "relu6",
                     "c10": "relu6"}
    assert fast.fused_activations == 7
    for name in ("c7", "c8", "c9"):
        assert isinstance(fast.get_submodule(name), nn.Conv2d), name
    assert bool((expected == 6).any())
    assert_close(fast(x), expected)  # float32 model: float32 tolerance
    assert not any(isinstance(m, fastconv.nn.ConvBiasAct) for m in model.modules())


def test_model_with_neither_batchnorm_nor_activation_after_a_conv_is_unchanged():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(3 * 16, 2)).eval()
    x = torch.randn(2, 2, 6, 6)
    fast = fastconv.optimize(model)
    assert fast.folded_batchnorms == 0 and fast.fused_activations == 0
    assert_close(fast(x), model(x))


def test_conv_called_twice_is_not_replaced():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x)) + self.conv(x)  # one module, two call sites

    model = Twice().eval()
    x = torch.randn(1, 3, 5, 5)
    fast = fastconv.optimize(model)
    assert fast.fused_activations == 0
    assert_close(fast(x), model(x))


def test_flop_count_of_the_optimized_model_equals_the_original():
    """fastconv.flops sees the fused op as the conv it is: same MACs, each ConvBiasAct a conv2d row."""
    model = fastconv.convert(fastconv.nn.to_torch(fastconv.models.resnet18()).eval())
    x = torch.randn(1, 3, 32, 32)
    fast = fastconv.optimize(model)
    before, after = fastconv.flops.count(model, x), fastconv.flops.count(fast, x)
    assert after.forward_macs == before.forward_macs
    node = after.module("layer1.0.conv1")
    assert node.type == "ConvBiasAct" and [r.op for r in node.ops] == ["conv2d"]


def test_optimized_model_under_autocast_runs_its_fused_convs_in_the_autocast_dtype():
    """Under torch.autocast the fused op casts like a conv (torch's autocast rule for convolutions): without
    that rule the fused layers ran in float32 and the model's result differed from the unfused one's."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(),
                          nn.Conv2d(8, 4, 1)).eval()
    fastconv.convert(model)
    fast = fastconv.optimize(model)
    assert fast.fused_activations == 2
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = model(x), fast(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out, expected)
