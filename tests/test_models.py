"""The architecture zoo: parameter counts (seeds and hand formulas), forward + backward of every model at a
small size, and -- where torchvision has the model -- equality with a twin built here from torch layers under
torchvision's module names (the twin's state_dict loads into the zoo model, same output in float64).

The twins are written from torchvision's published structure; torchvision itself is not installed.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as torch_F

import fastconv
from fastconv import flops, models
from helpers import assert_close

# seeds (seed_cases.json "counts", copied: the project runs without ../shared)
VGG_PARAMS_MILLIONS = {"A": 133, "A-LRN": 133, "B": 133, "C": 134, "D": 138, "E": 144}
RESNET18_PARAMS = 11_689_512
RESNET50_PARAMS = 25_557_032
GOOGLENET_PARAMS = 6_624_904
ALEXNET_TORCHVISION_PARAMS = 61_100_840


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(build, *args, **kwargs) -> nn.Module:
    with torch.device("meta"):  # full-size models without memory or init time
        return build(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# torch-layer twins with torchvision's names
# --------------------------------------------------------------------------------------------------
class TwinAlexNet(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(9216, 4096), nn.ReLU(inplace=True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


TV_VGG_CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class TwinVGG(nn.Module):
    def __init__(self, cfg, batch_norm=False, num_classes=1000, scale=1, hidden=4096):
        super().__init__()
        layers, c = [], 3
        for v in TV_VGG_CFGS[cfg]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                v //= scale
                layers += [nn.Conv2d(c, v, 3, padding=1)] + ([nn.BatchNorm2d(v)] if batch_norm else []) \
                    + [nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(c * 49, hidden), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TwinBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + idt)


class TwinBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


class TwinResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, 64, layers[0], 1)
        self.layer2 = self._layer(block, 128, layers[1], 2)
        self.layer3 = self._layer(block, 256, layers[2], 2)
        self.layer4 = self._layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _layer(self, block, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TwinBasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return torch_F.relu(self.bn(self.conv(x)), inplace=True)


class TwinInception(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pp):
        super().__init__()
        self.branch1 = TwinBasicConv2d(cin, c1, kernel_size=1)
        self.branch2 = nn.Sequential(TwinBasicConv2d(cin, c3r, kernel_size=1),
                                     TwinBasicConv2d(c3r, c3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(TwinBasicConv2d(cin, c5r, kernel_size=1),
                                     TwinBasicConv2d(c5r, c5, kernel_size=3, padding=1))  # torchvision's 3x3
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), TwinBasicConv2d(cin, pp, kernel_size=1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class TwinGoogLeNet(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = TwinBasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = TwinBasicConv2d(64, 64, kernel_size=1)
        self.conv3 = TwinBasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = TwinInception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = TwinInception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = TwinInception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = TwinInception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = TwinInception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = TwinInception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = TwinInception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.inception5a = TwinInception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = TwinInception(832, 384, 192, 384, 48, 128, 128)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4d(self.inception4c(self.inception4b(self.inception4a(x))))
        x = self.inception5b(self.inception5a(self.maxpool4(self.inception4e(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def _randomise_bn(model: nn.Module) -> None:
    # fresh BatchNorm is the identity in eval mode; give it statistics so a misplaced BN would show
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


TWINS = {
    # name: (twin builder, zoo builder, input shape)
    "alexnet": (lambda: TwinAlexNet(10), lambda: models.alexnet(10), (2, 3, 64, 64)),
    "vgg11": (lambda: TwinVGG("A", scale=16, hidden=32, num_classes=10),
              lambda: models.vgg11(width_multiplier=1 / 16, hidden=32, num_classes=10), (2, 3, 32, 32)),
    "vgg16_bn": (lambda: TwinVGG("D", True, scale=16, hidden=32, num_classes=10),
                 lambda: models.vgg16_bn(width_multiplier=1 / 16, hidden=32, num_classes=10), (2, 3, 32, 32)),
    "resnet18": (lambda: TwinResNet(TwinBasicBlock, [2, 2, 2, 2], 10), lambda: models.resnet18(10), (2, 3, 32, 32)),
    "resnet50": (lambda: TwinResNet(TwinBottleneck, [3, 4, 6, 3], 10), lambda: models.resnet50(10), (1, 3, 32, 32)),
    "googlenet": (lambda: TwinGoogLeNet(10), lambda: models.googlenet(10), (1, 3, 64, 64)),
}


@pytest.mark.parametrize("name", list(TWINS))
def test_torchvision_twin_state_dict_loads_and_outputs_match(name):
    twin_build, zoo_build, shape = TWINS[name]
    twin, zoo = twin_build().double().eval(), zoo_build().double().eval()
    _randomise_bn(twin)
    assert [(k, v.shape) for k, v in zoo.state_dict().items()] == [(k, v.shape) for k, v in twin.state_dict().items()]
    zoo.load_state_dict(twin.state_dict(), strict=True)
    x = torch.randn(*shape, dtype=torch.float64)
    assert_close(zoo(x), twin(x), what=name)
    # the zoo really runs fastconv's kernels, not torch's
    assert any(type(m).__module__.startswith("fastconv") for m in zoo.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("zoo_build,twin_build", [
    (models.vgg19_bn, lambda: TwinVGG("E", True)), (models.vgg13, lambda: TwinVGG("B")),
    (models.resnet50, lambda: TwinResNet(TwinBottleneck, [3, 4, 6, 3])), (models.alexnet, TwinAlexNet),
    (models.googlenet, TwinGoogLeNet)], ids=["vgg19_bn", "vgg13", "resnet50", "alexnet", "googlenet"])
def test_full_size_state_dict_keys_and_shapes_are_torchvisions(zoo_build, twin_build):
    zoo, twin = on_meta(zoo_build), on_meta(twin_build)
    assert [(k, v.shape) for k, v in zoo.state_dict().items()] == [(k, v.shape) for k, v in twin.state_dict().items()]


# --------------------------------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", list(VGG_PARAMS_MILLIONS))
def test_vgg_paper_parameter_counts(config):
    model = on_meta(models.vgg, config)
    assert round(n_params(model) / 1e6) == VGG_PARAMS_MILLIONS[config]
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    # weight layers: 8, 8, 10, 13, 13, 16 convs + 3 fully connected (the "11".."19" of the names)
    assert len(convs) + 3 == {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}[config]
    if config == "C":
        assert sum(m.kernel_size == (1, 1) for m in convs) == 3
    assert any(isinstance(m, nn.LocalResponseNorm) for m in model.features) == (config == "A-LRN")


def test_named_parameter_counts():
    assert n_params(on_meta(models.resnet18)) == RESNET18_PARAMS
    assert n_params(on_meta(models.resnet50)) == RESNET50_PARAMS
    assert n_params(on_meta(models.googlenet)) == GOOGLENET_PARAMS
    assert n_params(on_meta(models.alexnet)) == ALEXNET_TORCHVISION_PARAMS
    assert round(n_params(on_meta(models.alexnet)) / 1e6) == 61
    assert round(n_params(on_meta(models.vgg16)) / 1e6) == 138


def test_googlenet_aux_heads_add_their_layers():
    # each aux head: 1x1 conv in->128 (no bias) + BN(128) + fc 2048->1024 + fc 1024->classes
    aux = lambda cin: cin * 128 + 2 * 128 + 2048 * 1024 + 1024 + 1024 * 1000 + 1000  # noqa: E731
    assert n_params(on_meta(models.googlenet, aux_logits=True)) == GOOGLENET_PARAMS + aux(512) + aux(528)


def test_lenet5_about_sixty_thousand():
    # C1 5x5x1x6, C3 5x5x6x16, C5 5x5x16x120, F6 120x84, output 84x10, biases
    expected = (25 * 6 + 6) + (25 * 6 * 16 + 16) + (25 * 16 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert n_params(models.lenet5()) == expected
    assert round(expected, -4) == 60_000


def test_mobilenet_v1_parameters_by_formula():
    def count(alpha):
        w = lambda c: int(c * alpha)  # noqa: E731
        total, cin = 27 * w(32) + 2 * w(32), w(32)  # stem 3x3x3 conv (no bias) + BN
        for cout, _ in models.mobilenet.BLOCKS:
            total += 9 * cin + 2 * cin + cin * w(cout) + 2 * w(cout)  # depthwise + BN, pointwise + BN
            cin = w(cout)
        return total + cin * 1000 + 1000
    assert n_params(on_meta(models.mobilenet_v1)) == count(1.0)
    assert round(count(1.0) / 1e6, 1) == 4.2  # the paper's 4.2 million
    assert n_params(on_meta(models.mobilenet_v1, width_multiplier=0.5)) == count(0.5)


def test_unet_dcgan_m5_parameters_by_formula():
    def double(cin, cout):
        return 9 * cin * cout + cout + 9 * cout * cout + cout
    widths = [64, 128, 256, 512, 1024]
    unet = double(1, 64) + sum(double(a, b) for a, b in zip(widths, widths[1:]))
    unet += sum(4 * a * b + b + double(2 * b, b) for a, b in zip(widths[:0:-1], widths[-2::-1]))
    unet += 64 * 2 + 2
    assert n_params(on_meta(models.unet)) == unet

    g = 100 * 512 * 16 + 512 * 256 * 16 + 256 * 128 * 16 + 128 * 64 * 16 + 64 * 3 * 16 + 2 * (512 + 256 + 128 + 64)
    assert n_params(on_meta(models.dcgan_generator)) == g
    d = 3 * 64 * 16 + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + 512 * 16 + 2 * (128 + 256 + 512)
    assert n_params(on_meta(models.dcgan_discriminator)) == d

    m5 = (80 * 128 + 128) + (3 * 128 * 128 + 128) + (3 * 128 * 256 + 256) + (3 * 256 * 512 + 512) \
        + 2 * (128 + 128 + 256 + 512) + 512 * 10 + 10
    assert n_params(models.m5()) == m5


def test_inception_3a_seed_channels_and_bottleneck_macs():
    block = models.Inception(192, 64, 96, 128, 16, 32, 32, five_by_five=True)
    x = torch.randn(1, 192, 28, 28)
    assert block(x).shape == (1, 256, 28, 28)  # 64 + 128 + 32 + 32
    macs = {r.name: r.macs for r in flops.count(block, x).rows if r.macs}
    assert macs["branch3.0.conv"] == 28 * 28 * 16 * 192 == 2_408_448
    assert macs["branch3.1.conv"] == 28 * 28 * 32 * 16 * 25 == 10_035_200
    assert macs["branch1.conv"] == 28 * 28 * 64 * 192
    assert macs["branch2.1.conv"] == 28 * 28 * 128 * 96 * 9


def test_zoo_mac_counts_against_layer_formulas():
    # ResNet-18 at 224: conv1 112x112x64 (7x7x3), fc 512x1000; the total is the widely quoted 1.82 GMACs
    rep = flops.count(on_meta(models.resnet18), torch.zeros(1, 3, 224, 224, device="meta"))
    by = {r.name: r.macs for r in rep.rows}
    assert by["conv1"] == 112 * 112 * 64 * 7 * 7 * 3
    assert by["fc"] == 512 * 1000
    assert by["layer1.0.conv1"] == 56 * 56 * 64 * 64 * 9
    # whole network by formula: per stage two basic blocks of two 3x3 convs; stages 2-4 start with a stride-2
    # conv from half the channels and a 1x1 stride-2 downsample
    total, cin = 112 * 112 * 64 * 49 * 3 + 1000 * 512, 64
    for width, size in ((64, 56), (128, 28), (256, 14), (512, 7)):
        total += size * size * width * (cin * 9 + width * 9 * 3)  # first conv of block 1, then three more
        if cin != width:
            total += size * size * width * cin  # downsample
        cin = width
    assert rep.macs == total
    assert round(rep.macs / 1e9, 3) == 1.814  # fvcore's reading for ResNet-18
    # VGG-16: every 3x3 conv is H*W*Cout*Cin*9 at its stage's size (the classic 15.5 GMACs)
    cfg, size, cin, expected = models.VGG_CONFIGS["D"], 224, 3, 0
    for v in cfg:
        if v == "M":
            size //= 2
        else:
            expected += size * size * v * cin * 9
            cin = v
    expected += 25088 * 4096 + 4096 * 4096 + 4096 * 1000
    assert flops.count(on_meta(models.vgg16), torch.zeros(1, 3, 224, 224, device="meta")).macs == expected


# --------------------------------------------------------------------------------------------------
# every model: forward + backward at a small size
# --------------------------------------------------------------------------------------------------
SMALL = {
    "lenet5": (lambda: models.lenet5(), (2, 1, 32, 32), (2, 10)),
    "alexnet": (lambda: models.alexnet(num_classes=5), (1, 3, 63, 63), (1, 5)),
    **{f"vgg-{c}": ((lambda c=c: models.vgg(c, width_multiplier=1 / 16, hidden=16, pool_size=1, num_classes=5)),
                    (2, 3, 32, 32), (2, 5)) for c in VGG_PARAMS_MILLIONS},
    "vgg11_bn": (lambda: models.vgg11_bn(width_multiplier=1 / 16, hidden=16, pool_size=1, num_classes=5),
                 (2, 3, 32, 32), (2, 5)),
    "resnet34": (lambda: models.resnet34(num_classes=5, width=8), (2, 3, 32, 32), (2, 5)),
    "resnet50": (lambda: models.resnet50(num_classes=5, width=8), (2, 3, 32, 32), (2, 5)),
    "googlenet": (lambda: models.googlenet(num_classes=5), (2, 3, 32, 32), (2, 5)),  # BN needs 2 at 1x1
    "mobilenet_v1": (lambda: models.mobilenet_v1(num_classes=5, width_multiplier=0.125), (2, 3, 32, 32), (2, 5)),
    "unet": (lambda: models.unet(in_channels=1, num_classes=3, base_channels=4, depth=3), (1, 1, 24, 16),
             (1, 3, 24, 16)),
    "dcgan_generator": (lambda: models.dcgan_generator(nz=8, ngf=4), (2, 8), (2, 3, 64, 64)),
    "dcgan_discriminator": (lambda: models.dcgan_discriminator(ndf=4), (2, 3, 64, 64), (2,)),
    "m5": (lambda: models.m5(num_classes=4, n_channel=8), (2, 1, 4000), (2, 4)),
    "c3d": (lambda: models.c3d(num_classes=4, width_multiplier=1 / 16, hidden=16), (1, 3, 16, 32, 32), (1, 4)),
    "yolo_head": (lambda: models.yolo_head(in_channels=16, hidden=16), (2, 16, 7, 7), (2, 7, 7, 30)),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_backward_small(name):
    build, in_shape, out_shape = SMALL[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*in_shape, requires_grad=True)
    out = model(x)
    assert tuple(out.shape) == out_shape
    out.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_googlenet_aux_heads_in_training_mode():
    model = models.googlenet(num_classes=5, aux_logits=True).train()
    out = model(torch.randn(2, 3, 64, 64))
    from fastconv.models.googlenet import GoogLeNetOutputs

    assert isinstance(out, GoogLeNetOutputs)
    assert out.logits.shape == out.aux_logits1.shape == out.aux_logits2.shape == (2, 5)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_unet_rejects_sizes_it_cannot_pool():
    with pytest.raises(ValueError, match="multiples of 2\\*\\*depth = 8"):
        models.unet(base_channels=2, depth=3)(torch.zeros(1, 1, 20, 16))


def test_zoo_is_built_from_fastconv_layers():
    model = models.resnet18(num_classes=5, width=8)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, (nn.MaxPool2d, nn.AdaptiveAvgPool2d))]
    assert convs and all(isinstance(m, (fastconv.nn.Conv2d,)) for m in convs)
    assert pools and all(type(m).__module__.startswith("fastconv") for m in pools)
    ups = [m for m in models.unet(base_channels=2, depth=2).modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 2 and all(isinstance(m, fastconv.nn.ConvTranspose2d) for m in ups)
