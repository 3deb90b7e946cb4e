// fastconv.emu stand-in for <cuda_runtime.h>: the device API comes from cuda_emu.h.
#pragma once
