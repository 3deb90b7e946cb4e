// fastconv.emu cannot run code that needs <cuda_bf16.h>.
#error "<cuda_bf16.h> is not supported by fastconv.emu (the CPU harness for CUDA kernels)"
