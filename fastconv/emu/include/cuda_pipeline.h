// fastconv.emu cannot run code that needs <cuda_pipeline.h>.
#error "<cuda_pipeline.h> is not supported by fastconv.emu (the CPU harness for CUDA kernels)"
