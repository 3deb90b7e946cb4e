// __half / __nv_bfloat16 conversions and arithmetic (the subset of <cuda_fp16.h>/<cuda_bf16.h>
// that fastconv's kernels use); out gets bits so the test compares them exactly.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

extern "C" __global__ void half_roundtrip(const float* __restrict__ x, unsigned short* __restrict__ h,
                                          unsigned short* __restrict__ bf, float* __restrict__ back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half a = __float2half_rn(x[i]);
  const __nv_bfloat16 b = __float2bfloat16(x[i]);
  h[i] = __half_as_ushort(a);
  bf[i] = __bfloat16_as_ushort(b);
  back[2 * i] = __half2float(a);
  back[2 * i + 1] = __bfloat162float(b);
}

// y[i] = x[i] * w[i] + x[i] in half (fma, then add), and the pair conversions.
extern "C" __global__ void half_math(const __half* __restrict__ x, const __half* __restrict__ w, __half* __restrict__ y,
                                     float* __restrict__ pairs, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i] = __hadd(__hfma(x[i], w[i], __float2half(0.0f)), x[i]);
  const __half2 p = __floats2half2_rn(__half2float(x[i]), 2.0f);
  const float2 q = __half22float2(p);
  pairs[2 * i] = q.x;
  pairs[2 * i + 1] = __high2float(p);
}
