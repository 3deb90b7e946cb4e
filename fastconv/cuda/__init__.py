"""fastconv's CUDA backend: ``kernels/*.cu`` compiled at run time and launched through CuPy.

* :mod:`.loader` finds the ``.cu`` sources shipped in the package, builds ``cupy.RawModule``
  (NVRTC) per device and option set, or ``fastconv.emu.RawModule`` (the CPU execution harness) for
  the ``"cuda-emu"`` target, with the same code and options (:data:`loader.OPTIONS`).
* :mod:`.launch` turns tensors and ints into kernel arguments and launches on torch's current
  stream (DLPack, no copies); the same launch code drives the GPU and the harness.
* :mod:`.conv` and :mod:`.pool` hold the host side of each kernel family (grid maths, argument
  order); :mod:`.register` installs them: the conv algorithms ``cuda-direct``, ``implicit-gemm``
  and ``cuda-depthwise`` for targets ``"cuda"`` and ``"cuda-emu"``, a heuristic per target, and the
  pooling kernels.

Importing this package does not import CuPy: that happens at the first CUDA tensor, and without
CuPy the error says ``pip install fastconv[cuda]``.
"""
