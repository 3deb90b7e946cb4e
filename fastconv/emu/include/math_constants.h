// fastconv.emu stand-in for CUDA's <math_constants.h>: cuda_emu.h defines CUDART_INF_F & co.
#pragma once
