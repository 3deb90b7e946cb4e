// fastconv.emu cannot run code that needs <cooperative_groups.h>.
#error "<cooperative_groups.h> is not supported by fastconv.emu (the CPU harness for CUDA kernels)"
