"""``convert(model)``: swap the conv/pool layers of any existing model for fastconv's, in place.

Each fastconv module class registers the torch class it replaces with :func:`replaces`; ``convert``
walks the model and rebuilds every registered layer from its constructor arguments, keeping its
parameters and buffers (same tensors, so optimisers and tied weights keep working).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import nn

#: torch layer class -> function building the fastconv equivalent from an instance.
_CONVERSIONS: dict[type, Callable[[nn.Module], nn.Module]] = {}
_FASTCONV_CLASSES: set[type] = set()
#: fastconv module class -> the torch layer class it replaces (for :func:`to_torch`).
_TORCH_CLASS_OF: dict[type, type] = {}


def replaces(torch_cls: type):
    """Class decorator: the decorated fastconv module replaces ``torch_cls`` in :func:`convert`.

    The decorated class must provide ``from_torch(module) -> fastconv module``.
    """
    def decorate(cls):
        _CONVERSIONS[torch_cls] = cls.from_torch
        _FASTCONV_CLASSES.add(cls)
        _TORCH_CLASS_OF[cls] = torch_cls
        return cls
    return decorate


#: Methods whose override in a subclass changes what the layer computes: such a subclass is left alone.
_COMPUTING_METHODS = ("forward", "_conv_forward", "_output_padding")


def _builder_for(cls: type) -> tuple[Optional[Callable[[nn.Module], nn.Module]], Optional[str]]:
    """The conversion of ``cls``, or ``(None, why not)``.

    A subclass of a torch layer (torchvision's ``Conv3DSimple`` is an ``nn.Conv3d`` with its own
    ``__init__``) converts like its base when it changes only how the layer is constructed; one that
    overrides a computing method keeps its own forward.
    """
    if cls in _CONVERSIONS:
        return _CONVERSIONS[cls], None
    if any(issubclass(cls, f) for f in _FASTCONV_CLASSES):
        return None, None  # already fastconv
    for i, base in enumerate(cls.__mro__):
        if base in _CONVERSIONS:
            overrides = [m for c in cls.__mro__[:i] for m in _COMPUTING_METHODS if m in vars(c)]
            if overrides:
                return None, (f"{cls.__name__} subclasses {base.__module__}.{base.__name__} and overrides "
                              f"{', '.join(sorted(set(overrides)))}")
            return _CONVERSIONS[base], None
    return None, None


def convert(model: nn.Module, *, algo: str | None = None) -> nn.Module:
    """Replace, in place, every torch layer fastconv implements with its fastconv module.

    Weights and buffers are carried over (the same Parameter objects), training/eval mode is kept.
    Subclasses of torch's layers that only change construction are converted too; a subclass that
    overrides ``forward`` is left as it is, and one warning names every layer left and why.
    Already-fastconv layers are kept (only their ``algo`` is set, when given). ``algo`` sets the
    algorithm of the new conv layers. Returns ``model`` (or the converted layer when ``model`` itself
    is a convertible layer).

    >>> net = torchvision.models.resnet18(); fastconv.convert(net)   # now runs fastconv kernels
    """
    left: list[str] = []

    def swap(module: nn.Module, path: str) -> nn.Module:
        build, why_not = _builder_for(type(module))
        if build is None:
            if why_not:
                left.append(f"{path or '(the model)'}: {why_not}")
            if algo is not None and any(isinstance(module, f) for f in _FASTCONV_CLASSES):
                module.algo = algo
            return module
        new = build(module)
        if algo is not None and hasattr(new, "algo"):
            new.algo = algo
        new.train(module.training)
        return new

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            new = swap(child, path)
            if new is not child:
                setattr(module, name, new)
            else:
                walk(child, path)

    root = swap(model, "")
    if root is model:
        walk(model, "")
    if left:
        warnings.warn(f"fastconv.convert left {len(left)} layer(s) on torch's kernels: " + "; ".join(left),
                      UserWarning, stacklevel=2)
    return root


def _copy_state(dst: nn.Module, src: nn.Module) -> nn.Module:
    """Give ``dst`` the very Parameter/buffer objects of ``src`` (no copies, tied weights stay tied)."""
    for name, p in src.named_parameters(recurse=False):
        setattr(dst, name, p)
    for name, b in src.named_buffers(recurse=False):
        dst.register_buffer(name, b)
    return dst


def to_torch(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`, in place: every fastconv layer back to the torch layer it replaced.

    Parameters and buffers are the same objects. Used to time or export the torch twin of a model built
    from fastconv layers (``fastconv bench --models``); fastconv layers with no torch counterpart
    (``MinPool2d``, ``DepthwiseSeparableConv2d``) are left as they are. Returns ``model`` (or the new
    layer when ``model`` itself is a fastconv layer).
    """
    def back(module: nn.Module) -> nn.Module:
        torch_cls = _TORCH_CLASS_OF.get(type(module))
        if torch_cls is None:
            return module
        twin = torch_cls.__new__(torch_cls)
        twin.__dict__.update(module.__dict__)  # same parameters, buffers, hooks and settings
        twin.__dict__.pop("algo", None)
        return twin

    root = back(model)
    if root is not model:
        return root
    for name, child in list(model.named_children()):
        new = back(child)
        if new is not child:
            setattr(model, name, new)
        else:
            to_torch(child)
    return model
