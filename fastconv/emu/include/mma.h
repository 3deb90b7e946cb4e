// fastconv.emu cannot run code that needs <mma.h>.
#error "<mma.h> is not supported by fastconv.emu (the CPU harness for CUDA kernels)"
