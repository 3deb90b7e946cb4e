"""``convert(model)``: swap the conv/pool layers of any existing model for fastconv's, in place.

Each fastconv module class registers the torch class it replaces with :func:`replaces`; ``convert``
walks the model and rebuilds every registered layer from its constructor arguments, keeping its
parameters and buffers (same tensors, so optimisers and tied weights keep working).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

#: torch layer class -> function building the fastconv equivalent from an instance.
_CONVERSIONS: dict[type, Callable[[nn.Module], nn.Module]] = {}
_FASTCONV_CLASSES: set[type] = set()


def replaces(torch_cls: type):
    """Class decorator: the decorated fastconv module replaces ``torch_cls`` in :func:`convert`.

    The decorated class must provide ``from_torch(module) -> fastconv module``.
    """
    def decorate(cls):
        _CONVERSIONS[torch_cls] = cls.from_torch
        _FASTCONV_CLASSES.add(cls)
        return cls
    return decorate


def convert(model: nn.Module, *, algo: str | None = None) -> nn.Module:
    """Replace, in place, every torch layer fastconv implements with its fastconv module.

    Weights and buffers are carried over (the same Parameter objects), training/eval mode is kept.
    Already-fastconv layers are kept (only their ``algo`` is set, when given). ``algo`` sets the algorithm of the new conv layers.
    Returns ``model`` (or the converted layer when ``model`` itself is a convertible layer).

    >>> net = torchvision.models.resnet18(); fastconv.convert(net)   # now runs fastconv kernels
    """
    def swap(module: nn.Module) -> nn.Module:
        build = _CONVERSIONS.get(type(module))  # exact type: fastconv subclasses are not re-converted
        if build is None:
            if algo is not None and type(module) in _FASTCONV_CLASSES:
                module.algo = algo
            return module
        new = build(module)
        if algo is not None and hasattr(new, "algo"):
            new.algo = algo
        new.train(module.training)
        return new

    root = swap(model)
    if root is not model:
        return root
    for name, child in list(model.named_children()):
        new = swap(child)
        if new is not child:
            setattr(model, name, new)
        else:
            convert(child, algo=algo)
    return model


def _copy_state(dst: nn.Module, src: nn.Module) -> nn.Module:
    """Give ``dst`` the very Parameter/buffer objects of ``src`` (no copies, tied weights stay tied)."""
    for name, p in src.named_parameters(recurse=False):
        setattr(dst, name, p)
    for name, b in src.named_buffers(recurse=False):
        dst.register_buffer(name, b)
    return dst
