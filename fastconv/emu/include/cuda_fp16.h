// fastconv.emu cannot run code that needs <cuda_fp16.h>.
#error "<cuda_fp16.h> is not supported by fastconv.emu (the CPU harness for CUDA kernels)"
