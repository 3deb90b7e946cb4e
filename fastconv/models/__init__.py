"""The architecture zoo: classic CNNs built from fastconv layers (conv and pooling from :mod:`fastconv.nn`;
Linear, BatchNorm, ReLU, Dropout, LocalResponseNorm from torch).

Where torchvision has the model (``alexnet``, ``vgg11``..``vgg19`` with and without BN, ``resnet18/34/50``,
``googlenet``) the module and parameter names are torchvision's, so its ``state_dict`` loads.

============================ ===================================== =================================
builder                      input                                 output
============================ ===================================== =================================
``lenet5``                   (N, 1, 32, 32)                        (N, 10)
``alexnet``                  (N, 3, 224, 224)                      (N, 1000)
``vgg(config)``, ``vggNN``   (N, 3, 224, 224)                      (N, 1000)
``resnet18/34/50``           (N, 3, 224, 224)                      (N, 1000)
``googlenet``                (N, 3, 224, 224)                      (N, 1000)
``mobilenet_v1``             (N, 3, 224, 224)                      (N, 1000)
``unet``                     (N, 1, H, W), H, W multiples of 16    (N, 2, H, W)
``dcgan_generator``          (N, 100) or (N, 100, 1, 1)            (N, 3, 64, 64)
``dcgan_discriminator``      (N, 3, 64, 64)                        (N,)
``m5``                       (N, 1, 32000)                         (N, 10)
``c3d``                      (N, 3, 16, 112, 112)                  (N, 487)
``yolo_head``                (N, 1024, 7, 7)                       (N, 7, 7, 30)
============================ ===================================== =================================

:data:`MODELS` maps each builder's name (and ``vgg-a`` ... ``vgg-e`` for the paper's configurations) to the
builder and a default input shape; ``fastconv flops MODEL`` uses it.

Activations are not in place (torchvision's are): ``fastconv::conv*d`` returns a reshaped view of its
kernel's output, and autograd refuses to modify a custom op's view output in place ("Output 0 of
GeneratedBackwardFor_fastconv_conv2d_default is a view and is being modified inplace"). Outputs and
state_dicts are unaffected; only the memory of one activation per layer differs.
"""
from __future__ import annotations

from functools import partial

from .alexnet import AlexNet, alexnet
from .audio import M5, m5
from .c3d import C3D, c3d
from .dcgan import DCGANDiscriminator, DCGANGenerator, dcgan_discriminator, dcgan_generator
from .googlenet import GoogLeNet, Inception, googlenet
from .lenet import LeNet5, lenet5
from .mobilenet import MobileNetV1, mobilenet_v1
from .resnet import ResNet, resnet18, resnet34, resnet50
from .unet import UNet, unet
from .vgg import (CONFIGS as VGG_CONFIGS, VGG, vgg, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19,
                  vgg19_bn)
from .yolo import YOLOHead, yolo_head

#: name -> (builder, default input shape including the batch dim of 1)
MODELS = {
    "lenet5": (lenet5, (1, 1, 32, 32)),
    "alexnet": (alexnet, (1, 3, 224, 224)),
    **{f"vgg-{c.lower()}": (partial(vgg, c), (1, 3, 224, 224)) for c in VGG_CONFIGS},
    "vgg11": (vgg11, (1, 3, 224, 224)), "vgg13": (vgg13, (1, 3, 224, 224)),
    "vgg16": (vgg16, (1, 3, 224, 224)), "vgg19": (vgg19, (1, 3, 224, 224)),
    "vgg11_bn": (vgg11_bn, (1, 3, 224, 224)), "vgg13_bn": (vgg13_bn, (1, 3, 224, 224)),
    "vgg16_bn": (vgg16_bn, (1, 3, 224, 224)), "vgg19_bn": (vgg19_bn, (1, 3, 224, 224)),
    "resnet18": (resnet18, (1, 3, 224, 224)), "resnet34": (resnet34, (1, 3, 224, 224)),
    "resnet50": (resnet50, (1, 3, 224, 224)),
    "googlenet": (googlenet, (1, 3, 224, 224)),
    "mobilenet_v1": (mobilenet_v1, (1, 3, 224, 224)),
    "unet": (unet, (1, 1, 256, 256)),
    "dcgan_generator": (dcgan_generator, (1, 100, 1, 1)),
    "dcgan_discriminator": (dcgan_discriminator, (1, 3, 64, 64)),
    "m5": (m5, (1, 1, 32000)),
    "c3d": (c3d, (1, 3, 16, 112, 112)),
    "yolo_head": (yolo_head, (1, 1024, 7, 7)),
}

__all__ = [
    "MODELS", "lenet5", "alexnet", "vgg", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn",
    "vgg19_bn", "VGG_CONFIGS", "resnet18", "resnet34", "resnet50", "googlenet", "mobilenet_v1", "unet",
    "dcgan_generator", "dcgan_discriminator", "m5", "c3d", "yolo_head",
    "LeNet5", "AlexNet", "VGG", "ResNet", "GoogLeNet", "Inception", "MobileNetV1", "UNet", "DCGANGenerator",
    "DCGANDiscriminator", "M5", "C3D", "YOLOHead",
]
