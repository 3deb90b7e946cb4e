"""The layer benchmark suite as data: which layers, how to build their inputs, what to call.

:data:`SUITE` lists :class:`Layer` entries (name, architecture, op, shapes, keyword arguments). Each entry
carries, per pass, a :class:`PassImpl`: how to build the inputs, the fastconv callable (taking an
algorithm name) and the torch callable computing the same thing. Convolutions are built by
:func:`conv_layer`; another op family (transposed convs, pooling) adds entries with its own factory, and
the runner (:mod:`fastconv.bench_runner`) and report (:mod:`fastconv.bench_report`) need no change.

This module imports only torch and the standard library, and reaches fastconv only inside the
fastconv callables (``torch.ops.fastconv.*``, looked up at call time) and :meth:`Layer.algorithms`:
the torch baseline worker (:mod:`fastconv.bench_torch_worker`) loads it by file path, so that torch is
timed in a process that never imports fastconv, Numba or their thread pools.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

PASSES = ("forward", "grad_input", "grad_weight")


@dataclass(frozen=True)
class PassImpl:
    """One pass of one layer: ``inputs(dtype, generator) -> tuple``, then ``fastconv(inputs, algo)`` and
    ``torch(inputs)`` return the same tensor."""

    inputs: Callable[[torch.dtype, torch.Generator], tuple]
    fastconv: Callable[[tuple, str], torch.Tensor]
    torch: Callable[[tuple], torch.Tensor]


@dataclass(frozen=True)
class Layer:
    """One entry of the suite.

    ``macs`` is the multiply-accumulate count of one pass; ``algorithms(dtype)`` names the registered
    fastconv algorithms that accept the layer (``"auto"`` and ``"torch"`` are always run besides);
    ``slow`` layers are left out of ``--quick`` unless named; ``quick`` layers form the quick subset.
    """

    name: str
    arch: str
    op: str
    shapes: dict
    kwargs: dict
    macs: int
    passes: dict
    algorithms: Callable[[torch.dtype], list]
    slow: bool = False
    quick: bool = False

    def describe(self) -> str:
        shapes = " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in self.shapes.items())
        kw = " ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.op} {shapes} {kw}".strip()



# --------------------------------------------------------------------------------------------------
# convolution entries
# --------------------------------------------------------------------------------------------------
def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length along one dim (torch's formula, symmetric padding, floor mode)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_macs(x_shape, w_shape, out_spatial, groups: int) -> int:
    """Multiply-accumulates of one pass: N x K x prod(out) x (C / groups) x prod(kernel)."""
    return x_shape[0] * w_shape[0] * math.prod(out_spatial) * (x_shape[1] // groups) * math.prod(w_shape[2:])


def _fastconv_op(name: str):
    """``torch.ops.fastconv.<name>``, looked up at call time (the torch worker never registers it)."""
    def call(*args):
        return getattr(torch.ops.fastconv, name)(*args)

    return call


class _FastconvOps:
    """``torch.ops.fastconv`` resolved at call time (see :func:`_fastconv_op`)."""

    def __getattr__(self, name):
        return _fastconv_op(name)


def _candidates(ndim, x_shape, w_shape, stride, padding, dilation, groups, dtype) -> list[str]:
    """The registered fastconv algorithms that accept this convolution (imports fastconv)."""
    from fastconv import backends, registry
    from fastconv.ops.conv import make_geometry

    g = make_geometry(ndim, x_shape[0], x_shape[1], w_shape[0], groups, x_shape[2:], w_shape[2:], None,
                      stride, padding, padding, dilation, dtype, backends.current())
    return [alg.name for alg in registry.candidates(g)]


def conv_layer(name: str, arch: str, batch: int, in_channels: int, out_channels: int,
               spatial: Sequence[int], kernel: Sequence[int], *, stride=1, padding=0, dilation=1,
               groups: int = 1, slow: bool = False, quick: bool = False) -> Layer:
    """A conv{1,2,3}d entry: input (batch, in_channels, *spatial), weight (out, in/groups, *kernel), no bias.

    Passes: ``forward`` (torch: ``aten.convolution``), ``grad_input`` and ``grad_weight`` (fastconv:
    ``torch.ops.fastconv.conv{d}d_grad_input/_grad_weight``; torch: ``aten.convolution_backward`` with
    one output requested).
    """
    ndim = len(spatial)
    expand = lambda v: [int(v)] * ndim if isinstance(v, int) else [int(i) for i in v]  # noqa: E731
    stride_l, pad_l, dil_l = expand(stride), expand(padding), expand(dilation)
    x_shape = (batch, in_channels, *spatial)
    w_shape = (out_channels, in_channels // groups, *kernel)
    out_spatial = [_out_size(i, k, s, p, d) for i, k, s, p, d in zip(spatial, kernel, stride_l, pad_l, dil_l)]
    y_shape = (batch, out_channels, *out_spatial)
    ops = _fastconv_op(f"conv{ndim}d")
    op_gi = _fastconv_op(f"conv{ndim}d_grad_input")
    op_gw = _fastconv_op(f"conv{ndim}d_grad_weight")
    aten_bw = torch.ops.aten.convolution_backward.default
    zeros = [0] * ndim

    def randn(shape, dtype, gen):
        return torch.randn(shape, dtype=dtype, generator=gen)

    def fwd_inputs(dtype, gen):
        return randn(x_shape, dtype, gen), randn(w_shape, dtype, gen)

    def gi_inputs(dtype, gen):
        # The input tensor only tells aten.convolution_backward its shape; fastconv takes the size.
        return randn(y_shape, dtype, gen), randn(w_shape, dtype, gen), torch.empty(x_shape, dtype=dtype)

    def gw_inputs(dtype, gen):
        return randn(y_shape, dtype, gen), randn(x_shape, dtype, gen), torch.empty(w_shape, dtype=dtype)

    passes = {
        "forward": PassImpl(
            fwd_inputs,
            lambda t, algo: ops(t[0], t[1], None, stride_l, pad_l, pad_l, dil_l, groups, algo),
            lambda t: torch.ops.aten.convolution.default(t[0], t[1], None, stride_l, pad_l, dil_l, False,
                                                         zeros, groups)),
        "grad_input": PassImpl(
            gi_inputs,
            lambda t, algo: op_gi(t[0], t[1], list(x_shape[2:]), stride_l, pad_l, pad_l, dil_l, groups, algo),
            lambda t: aten_bw(t[0], t[2], t[1], None, stride_l, pad_l, dil_l, False, zeros, groups,
                              [True, False, False])[0]),
        "grad_weight": PassImpl(
            gw_inputs,
            lambda t, algo: op_gw(t[0], t[1], list(w_shape[2:]), stride_l, pad_l, pad_l, dil_l, groups, algo),
            lambda t: aten_bw(t[0], t[1], t[2], None, stride_l, pad_l, dil_l, False, zeros, groups,
                              [False, True, False])[1]),
    }

    def algorithms(dtype):
        return _candidates(ndim, x_shape, w_shape, stride_l, pad_l, dil_l, groups, dtype)

    defaults = dict(stride=1, padding=0, dilation=1, groups=1)  # shown only where they differ
    kwargs = {k: v for k, v in dict(stride=stride, padding=padding, dilation=dilation, groups=groups).items()
              if v != defaults[k]}
    return Layer(name, arch, f"conv{ndim}d", {"input": x_shape, "weight": w_shape, "output": y_shape},
                 kwargs, _conv_macs(x_shape, w_shape, out_spatial, groups), passes, algorithms, slow=slow,
                 quick=quick)


def _randn(shape, dtype, gen):
    return torch.randn(shape, dtype=dtype, generator=gen)


def conv_transpose_layer(name: str, arch: str, batch: int, in_channels: int, out_channels: int,
                         spatial: Sequence[int], kernel: int, *, stride: int = 1, padding: int = 0,
                         slow: bool = False, quick: bool = False) -> Layer:
    """A conv_transpose2d entry: input (batch, in, *spatial), weight (in, out, k, k), no bias.

    Passes: ``forward`` (``fastconv::conv_transpose2d``; auto may pick the kernel == stride GEMM),
    ``grad_input`` (a forward conv of the output gradient: ``fastconv::conv2d``) and ``grad_weight``
    (``fastconv::conv2d_grad_weight`` with the roles of input and output gradient swapped); torch:
    ``aten.convolution(transposed=True)`` and its backward.
    """
    k, s, p = [kernel] * 2, [stride] * 2, [padding] * 2
    x_shape = (batch, in_channels, *spatial)
    w_shape = (in_channels, out_channels, *k)
    y_shape = (batch, out_channels, *[(i - 1) * stride - 2 * padding + kernel for i in spatial])
    ones, zeros = [1, 1], [0, 0]
    aten_bw = torch.ops.aten.convolution_backward.default
    # The adjoint convolution (output -> input) is what the registry's algorithms see; its MACs are the
    # transposed conv's.
    adjoint_macs = _conv_macs(y_shape, w_shape, x_shape[2:], 1)

    passes = {
        "forward": PassImpl(
            lambda dtype, gen: (_randn(x_shape, dtype, gen), _randn(w_shape, dtype, gen)),
            lambda t, algo: _fastconv_op("conv_transpose2d")(t[0], t[1], None, s, p, zeros, ones, 1, algo),
            lambda t: torch.ops.aten.convolution.default(t[0], t[1], None, s, p, ones, True, zeros, 1)),
        "grad_input": PassImpl(
            lambda dtype, gen: (_randn(y_shape, dtype, gen), _randn(w_shape, dtype, gen),
                                torch.empty(x_shape, dtype=dtype)),
            lambda t, algo: _fastconv_op("conv2d")(t[0], t[1], None, s, p, p, ones, 1, algo),
            lambda t: aten_bw(t[0], t[2], t[1], None, s, p, ones, True, zeros, 1, [True, False, False])[0]),
        "grad_weight": PassImpl(
            lambda dtype, gen: (_randn(y_shape, dtype, gen), _randn(x_shape, dtype, gen),
                                torch.empty(w_shape, dtype=dtype)),
            lambda t, algo: _fastconv_op("conv2d_grad_weight")(t[1], t[0], k, s, p, p, ones, 1, algo),
            lambda t: aten_bw(t[0], t[1], t[2], None, s, p, ones, True, zeros, 1, [False, True, False])[1]),
    }

    def algorithms(dtype):
        return _candidates(2, y_shape, w_shape, s, p, ones, 1, dtype)

    return Layer(name, arch, "conv_transpose2d", {"input": x_shape, "weight": w_shape, "output": y_shape},
                 {"stride": stride, "padding": padding}, adjoint_macs, passes, algorithms, slow=slow,
                 quick=quick)


def pool_layer(name: str, arch: str, kind: str, shape: Sequence[int], *, kernel: int = 2,
               stride: Optional[int] = None, padding: int = 0, output_size: int = 1, slow: bool = False,
               quick: bool = False) -> Layer:
    """A pooling entry (``kind`` max, avg or adaptive_avg, 2-D): forward and grad_input passes.

    Pooling has one algorithm per target (``auto``). ``macs`` counts window elements (comparisons or
    additions), so the GFLOP/s column reads as G window-ops/s x 2.
    """
    stride = kernel if stride is None else stride
    k, s, p, d = [kernel] * 2, [stride] * 2, [padding] * 2, [1, 1]
    if kind == "adaptive_avg":
        out = [output_size] * 2
    else:
        out = [_out_size(i, kernel, stride, padding, 1) for i in shape[2:]]
    y_shape = (*shape[:2], *out)
    window = math.prod(k) if kind != "adaptive_avg" else math.prod(math.ceil(i / o) for i, o in zip(shape[2:], out))
    ops = _FastconvOps()

    def with_indices(dtype, gen):
        x = _randn(shape, dtype, gen)
        return _randn(y_shape, dtype, gen), torch.ops.aten.max_pool2d_with_indices(x, k, s, p, d, False)[1], x

    if kind == "max":
        forward = PassImpl(lambda dtype, gen: (_randn(shape, dtype, gen),),
                           lambda t, algo: ops.max_pool(t[0], k, s, p, d, False, False)[0],
                           lambda t: torch.ops.aten.max_pool2d_with_indices(t[0], k, s, p, d, False)[0])
        backward = PassImpl(with_indices, lambda t, algo: ops.max_pool_backward(t[0], t[1], list(shape[2:])),
                            lambda t: torch.ops.aten.max_pool2d_with_indices_backward(t[0], t[2], k, s, p, d,
                                                                                        False, t[1]))
    elif kind == "avg":
        forward = PassImpl(lambda dtype, gen: (_randn(shape, dtype, gen),),
                           lambda t, algo: ops.avg_pool(t[0], k, s, p, False, True, 0),
                           lambda t: torch.ops.aten.avg_pool2d(t[0], k, s, p, False, True, None))
        backward = PassImpl(lambda dtype, gen: (_randn(y_shape, dtype, gen), torch.empty(shape, dtype=dtype)),
                            lambda t, algo: ops.avg_pool_backward(t[0], list(shape[2:]), k, s, p, False, True, 0),
                            lambda t: torch.ops.aten.avg_pool2d_backward(t[0], t[1], k, s, p, False, True, None))
    else:
        forward = PassImpl(lambda dtype, gen: (_randn(shape, dtype, gen),),
                           lambda t, algo: ops.adaptive_avg_pool(t[0], out),
                           lambda t: torch.ops.aten._adaptive_avg_pool2d(t[0], out))
        backward = PassImpl(lambda dtype, gen: (_randn(y_shape, dtype, gen), torch.empty(shape, dtype=dtype)),
                            lambda t, algo: ops.adaptive_avg_pool_backward(t[0], list(shape[2:])),
                            lambda t: torch.ops.aten._adaptive_avg_pool2d_backward(t[0], t[1]))
    kwargs = {"output_size": output_size} if kind == "adaptive_avg" else {"kernel": kernel, "stride": stride,
                                                                          "padding": padding}
    return Layer(name, arch, f"{kind}_pool2d", {"input": tuple(shape), "output": y_shape}, kwargs,
                 math.prod(y_shape) * window, {"forward": forward, "grad_input": backward}, lambda dtype: [],
                 slow=slow, quick=quick)


#: The layer suite: the core issue's layers plus small, depthwise, 1-D and 3-D cases.
SUITE: list[Layer] = [
    conv_layer("lenet5_conv1", "LeNet-5", 64, 1, 6, (32, 32), (5, 5), quick=True),
    conv_layer("lenet5_conv2", "LeNet-5", 64, 6, 16, (14, 14), (5, 5), quick=True),
    conv_layer("resnet50_3x3", "ResNet-50", 8, 64, 64, (56, 56), (3, 3), padding=1),
    conv_layer("resnet50_1x1", "ResNet-50", 8, 512, 128, (28, 28), (1, 1), quick=True),
    conv_layer("resnet_3x3_256", "ResNet-50", 8, 256, 256, (14, 14), (3, 3), padding=1),
    conv_layer("vgg16_conv1_2", "VGG-16", 2, 64, 64, (224, 224), (3, 3), padding=1),
    conv_layer("vgg16_conv3", "VGG-16", 8, 256, 256, (56, 56), (3, 3), padding=1),
    conv_layer("alexnet_conv1", "AlexNet", 8, 3, 96, (227, 227), (11, 11), stride=4),
    conv_layer("inception_5x5", "Inception", 8, 192, 32, (28, 28), (5, 5), padding=2),
    conv_layer("mobilenet_dw3x3", "MobileNet", 8, 256, 256, (28, 28), (3, 3), padding=1, groups=256,
               quick=True),
    conv_layer("audio_conv1d", "audio front end", 16, 1, 128, (8000,), (80,), stride=4, quick=True),
    conv_layer("c3d_conv3d", "C3D", 2, 64, 64, (16, 56, 56), (3, 3, 3), padding=1, slow=True),
    conv_transpose_layer("unet_upconv", "U-Net", 4, 512, 256, (28, 28), 2, stride=2),
    conv_transpose_layer("dcgan_g2", "DCGAN", 64, 512, 256, (4, 4), 4, stride=2, padding=1),
    conv_transpose_layer("dcgan_g4", "DCGAN", 64, 128, 64, (16, 16), 4, stride=2, padding=1, quick=True),
    pool_layer("resnet_maxpool", "ResNet-50", "max", (8, 64, 112, 112), kernel=3, stride=2, padding=1,
               quick=True),
    pool_layer("densenet_avgpool", "DenseNet", "avg", (8, 256, 56, 56), kernel=2),
    pool_layer("resnet_global_avg", "ResNet-50", "adaptive_avg", (8, 2048, 7, 7), output_size=1),
]


def _depthwise_group() -> list[Layer]:
    """Issue 12's depthwise shapes, each at batch 8 and 1: the per-channel 3x3/5x5/7x7 convolutions of
    MobileNetV2, ShuffleNetV2, EfficientNet-B0 and ConvNeXt, plus the 512-channel 14x14 layer that lost
    to torch. Architecture ``"depthwise <net>"``, so ``--layers depthwise`` selects the group; marked
    slow so the default suite does not grow by 48 layers."""
    # (net, channels, size, kernel, stride); padding is kernel // 2 ("same" for stride 1)
    shapes = [("MobileNetV2", 32, 112, 3, 1), ("MobileNetV2", 96, 112, 3, 2), ("MobileNetV2", 144, 56, 3, 1),
              ("MobileNetV2", 144, 56, 3, 2), ("MobileNetV2", 192, 28, 3, 1), ("MobileNetV2", 384, 14, 3, 1),
              ("MobileNetV2", 576, 14, 3, 1), ("MobileNetV2", 576, 14, 3, 2), ("MobileNetV2", 960, 7, 3, 1)]
    shapes += [("ShuffleNetV2", c, hw, 3, s) for c, hw in ((58, 28), (116, 14), (232, 7)) for s in (1, 2)]
    shapes += [("EfficientNet-B0", 240, 28, 5, 2), ("EfficientNet-B0", 480, 14, 5, 1),
               ("EfficientNet-B0", 672, 14, 5, 1), ("EfficientNet-B0", 1152, 7, 5, 1)]
    shapes += [("ConvNeXt", c, hw, 7, 1) for c, hw in ((96, 56), (192, 28), (384, 14), (768, 7))]
    shapes += [("issue 12", 512, 14, 3, 1)]
    out = []
    for batch in (8, 1):
        for net, c, hw, k, s in shapes:
            name = f"dw{k}x{k}_c{c}_{hw}_s{s}_n{batch}"
            out.append(conv_layer(name, f"depthwise {net}", batch, c, c, (hw, hw), (k, k), stride=s,
                                  padding=k // 2, groups=c, slow=True))
    return out


SUITE += _depthwise_group()


def _held_out_group() -> list[Layer]:
    """Layers of the suite's networks (and their classic relatives) that the suite itself does not hold, for
    checking that what was tuned on the suite carries over (issue 12 asks the forward target of both): stems,
    1x1 expansions and projections, grouped, dilated, 1-D and 3-D convs, strided and transposed layers, pools.
    Architecture ``"held-out <net>"``, so ``--layers held-out`` selects the group; marked slow so the default
    suite does not grow."""
    def arch(net: str) -> str:
        return f"held-out {net}"

    return [
        conv_layer("ho_resnet_stem7x7", arch("ResNet"), 8, 3, 64, (224, 224), (7, 7), stride=2, padding=3, slow=True),
        conv_layer("ho_resnet_3x3_s2", arch("ResNet"), 8, 128, 256, (28, 28), (3, 3), stride=2, padding=1,
                   slow=True),
        conv_layer("ho_resnet50_expand1x1", arch("ResNet-50"), 8, 64, 256, (56, 56), (1, 1), slow=True),
        conv_layer("ho_resnet50_down1x1_s2", arch("ResNet-50"), 8, 1024, 2048, (14, 14), (1, 1), stride=2,
                   slow=True),
        conv_layer("ho_mobilenet_expand1x1", arch("MobileNetV2"), 8, 24, 144, (56, 56), (1, 1), slow=True),
        conv_layer("ho_mobilenet_project1x1", arch("MobileNetV2"), 8, 960, 160, (7, 7), (1, 1), slow=True),
        conv_layer("ho_densenet_1x1", arch("DenseNet"), 8, 704, 128, (14, 14), (1, 1), slow=True),
        conv_layer("ho_vgg_3x3_128", arch("VGG"), 8, 128, 256, (56, 56), (3, 3), padding=1, slow=True),
        conv_layer("ho_alexnet_conv2_5x5", arch("AlexNet"), 8, 64, 192, (27, 27), (5, 5), padding=2, slow=True),
        conv_layer("ho_alexnet_conv2_grouped", arch("AlexNet (2012, 2 groups)"), 8, 96, 256, (27, 27), (5, 5),
                   padding=2, groups=2, slow=True),
        conv_layer("ho_alexnet_conv3", arch("AlexNet"), 8, 192, 384, (13, 13), (3, 3), padding=1, slow=True),
        conv_layer("ho_googlenet_3x3", arch("GoogLeNet"), 8, 96, 128, (28, 28), (3, 3), padding=1, slow=True),
        conv_layer("ho_squeezenet_expand3x3", arch("SqueezeNet"), 8, 16, 64, (55, 55), (3, 3), padding=1,
                   slow=True),
        conv_layer("ho_resnext_grouped3x3", arch("ResNeXt"), 8, 128, 128, (56, 56), (3, 3), padding=1, groups=32,
                   slow=True),
        conv_layer("ho_deeplab_dilated3x3", arch("DeepLab"), 4, 256, 256, (32, 32), (3, 3), padding=2, dilation=2,
                   slow=True),
        conv_layer("ho_unet_3x3", arch("U-Net"), 1, 64, 64, (256, 256), (3, 3), padding=1, slow=True),
        conv_layer("ho_audio_conv1d_k7", arch("audio (Wav2Letter)"), 8, 250, 250, (800,), (7,), padding=3,
                   slow=True),
        conv_layer("ho_video_stem3d", arch("3-D video CNN"), 2, 3, 64, (16, 112, 112), (3, 3, 3), padding=1,
                   slow=True),
        conv_transpose_layer("ho_dcgan_g3", arch("DCGAN"), 64, 256, 128, (8, 8), 4, stride=2, padding=1,
                             slow=True),
        pool_layer("ho_googlenet_maxpool", arch("GoogLeNet"), "max", (8, 192, 56, 56), kernel=3, stride=2,
                   padding=1, slow=True),
        pool_layer("ho_mobilenet_global_avg", arch("MobileNetV2"), "adaptive_avg", (8, 1280, 7, 7), output_size=1,
                   slow=True),
    ]


SUITE += _held_out_group()


def select_layers(spec: Optional[str], quick: bool = False, suite: Sequence[Layer] = None) -> list[Layer]:
    """Layers named by ``spec`` (comma-separated exact names or substrings of name/architecture).

    Without ``spec``: the whole suite, or with ``quick`` the quick subset; slow layers only when named.
    Raises ValueError for a name that matches nothing, listing the known names.
    """
    suite = SUITE if suite is None else list(suite)
    if not spec:
        return [l for l in suite if (l.quick if quick else not l.slow)]
    chosen: list[Layer] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        exact = [l for l in suite if l.name == part]
        hits = exact or [l for l in suite if part.lower() in l.name.lower() or part.lower() in l.arch.lower()]
        if not hits:
            raise ValueError(f"unknown layer {part!r}; known layers: {', '.join(l.name for l in suite)}")
        chosen += [l for l in hits if l not in chosen]
    return chosen


def parse_passes(spec: Optional[str]) -> list[str]:
    """``"forward,grad_weight"`` -> list; aliases ``all``, ``fwd``, ``bwd`` (both gradients)."""
    if not spec or spec == "all":
        return list(PASSES)
    alias = {"fwd": ["forward"], "bwd": ["grad_input", "grad_weight"], "backward": ["grad_input", "grad_weight"]}
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        names = alias.get(part, [part])
        for n in names:
            if n not in PASSES:
                raise ValueError(f"unknown pass {part!r}; expected {', '.join(PASSES)} (or all, fwd, bwd)")
            if n not in out:
                out.append(n)
    return out


def parse_algos(spec: Optional[str]) -> Optional[list[str]]:
    """Algorithm names to run besides torch (None: every one that accepts a layer, plus auto)."""
    if not spec or spec == "all":
        return None
    from fastconv import registry

    known = registry.names() + ["torch"]
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part not in known:
            raise ValueError(f"unknown algorithm {part!r}; expected one of {', '.join(known)}")
        out.append(part)
    return out


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {', '.join(dtypes)}")
    return dtypes[name]

