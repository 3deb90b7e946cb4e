"""DCGAN generator and discriminator (Radford et al. 2015), from fastconv layers, 64x64 images.

Generator: latent (N, nz, 1, 1) -> 4x4 -> 8x8 -> 16x16 -> 32x32 -> 64x64 image (N, nc, 64, 64) through
transposed convs (4x4, stride 2, padding 1 after the first 4x4 stride-1 projection), BatchNorm + ReLU,
Tanh at the end. Discriminator: the mirror image with strided convs, LeakyReLU(0.2), Sigmoid probability
(N, 1, 1, 1) -> returned flattened (N,). Weights initialised N(0, 0.02), BatchNorm weights N(1, 0.02), as the
paper. With nz 100, 64 features, 3 channels: 3,576,704 (G) and 2,765,568 (D) parameters.
"""
from __future__ import annotations

from torch import Tensor, nn

from .. import nn as fnn

__all__ = ["DCGANGenerator", "DCGANDiscriminator", "dcgan_generator", "dcgan_discriminator"]


def _dcgan_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """(N, nz, 1, 1) or (N, nz) -> (N, nc, 64, 64) in [-1, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3):
        super().__init__()
        self.nz = nz
        layers: list[nn.Module] = [fnn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(ngf * 8), nn.ReLU()]
        for mult in (8, 4, 2):
            layers += [fnn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ngf * mult // 2), nn.ReLU()]
        layers += [fnn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.main(z)


class DCGANDiscriminator(nn.Module):
    """(N, nc, 64, 64) -> (N,) probabilities of "real"."""

    def __init__(self, nc: int = 3, ndf: int = 64):
        super().__init__()
        layers: list[nn.Module] = [fnn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        for mult in (1, 2, 4):
            layers += [fnn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult * 2), nn.LeakyReLU(0.2)]
        layers += [fnn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid()]
        self.main = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x).flatten()


def dcgan_generator(nz: int = 100, ngf: int = 64, nc: int = 3) -> DCGANGenerator:
    return DCGANGenerator(nz, ngf, nc)


def dcgan_discriminator(nc: int = 3, ndf: int = 64) -> DCGANDiscriminator:
    return DCGANDiscriminator(nc, ndf)
