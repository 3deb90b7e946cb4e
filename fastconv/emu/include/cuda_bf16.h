// fastconv.emu stand-in for <cuda_bf16.h>: __half, __nv_bfloat16, their pairs and conversions (emu_half.h).
#pragma once
#include "emu_half.h"
