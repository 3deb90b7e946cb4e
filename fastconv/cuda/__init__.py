"""fastconv's CUDA backend: ``kernels/*.cu`` compiled at run time and launched through CuPy.

* :mod:`.loader` finds the ``.cu`` sources shipped in the package, compiles them with NVRTC
  (driven directly: CuPy's RawModule would add ``-ftz=true``) and loads the image into the tensor's
  device per option set, or builds ``fastconv.emu.RawModule`` (the CPU execution harness) for the
  ``"cuda-emu"`` target, with the same code and options (:func:`loader.options`, which carry a
  hash of every kernel file so no cache serves a stale header).
* :mod:`.launch` turns tensors into kernel arguments (device pointers, no copies) and launches on
  torch's current stream of the tensor's device; the same launch code drives the GPU and the
  harness. Grids map work, not planes (:func:`launch.plane_grid`).
* :mod:`.conv` and :mod:`.pool` hold the host side of each kernel family (grid maths, argument
  order) and declare what they provide as data: the conv algorithms ``cuda-direct``,
  ``implicit-gemm`` and ``cuda-depthwise`` for targets ``"cuda"`` and ``"cuda-emu"``
  (``conv.ALGORITHMS``), a heuristic per target (``conv.HEURISTICS``) and the pooling kernels
  (``pool.POOL_IMPLS``); :mod:`fastconv.ops.catalog` registers them. Launch plans (grid, scalars,
  shapes) are cached per geometry.

No op makes the host wait for the GPU: a bad index found by a kernel becomes a device-side assert
(``torch._assert_async``), never an ``.item()``; ``tests/test_cuda_sync.py`` checks every op.

Importing this package does not import CuPy: that happens at the first CUDA tensor, and without
CuPy the error says ``pip install fastconv[cuda]``.
"""
