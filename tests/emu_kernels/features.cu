// Features beyond the basics: 3-D blocks, a templated kernel (reached through name_expressions),
// file-scope dynamic shared memory, in-place arguments and warp-level barriers.

extern __shared__ float file_scope_dyn[];  // CUDA allows the declaration at file scope

// out[linear thread id] = encoded (threadIdx, blockIdx); checks the 3-D index decomposition.
extern "C" __global__ void coords(int* __restrict__ out) {
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int nt = blockDim.x * blockDim.y * blockDim.z;
  __syncthreads();
  out[b * nt + t] = threadIdx.x | threadIdx.y << 4 | threadIdx.z << 8 | blockIdx.x << 12 | blockIdx.y << 16 | blockIdx.z << 20;
}

// Reverse each block's segment (the last one may be partial) in place through file-scope dynamic
// shared memory.
extern "C" __global__ void reverse_inplace(float* x, int n) {
  const int start = blockIdx.x * blockDim.x, t = threadIdx.x;
  const int m = min(blockDim.x, n - start);  // valid elements in this block
  if (t < m) file_scope_dyn[t] = x[start + t];
  __syncthreads();
  if (t < m) x[start + m - 1 - t] = file_scope_dyn[t];
}

// Planted: recursion far deeper than a thread's stack (1 KiB by default on the GPU).
__device__ int deep(int n) {
  volatile char pad[512];
  pad[0] = (char)n;
  return n ? deep(n - 1) + pad[0] : 0;
}
extern "C" __global__ void stack_hog(int* out, int n) { out[threadIdx.x] = deep(n); }

// y = a * x + y with the element type as a template parameter.
template <typename T, int UNROLL>
__global__ void axpy(T a, const T* __restrict__ x, T* __restrict__ y, int n) {
  for (int u = 0; u < UNROLL; ++u) {
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) * UNROLL + u;
    if (i < n) y[i] = a * x[i] + y[i];
  }
}

// Accumulate a into b (separate arguments that the caller may make the same array).
extern "C" __global__ void add_into(const float* a, float* b, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) b[i] += a[i];
}

// Planted: a full-mask shuffle executed by only half of the warp (the other lanes exit).
extern "C" __global__ void divergent_shuffle(float* __restrict__ y) {
  float v = threadIdx.x;
  if (threadIdx.x < 16) y[threadIdx.x] = __shfl_down_sync(0xffffffffu, v, 1);
}

// Planted: even and odd threads wait at different __syncthreads.
extern "C" __global__ void barrier_sites(float* __restrict__ y) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  y[threadIdx.x] = 1.0f;
}

// A kernel that traps when told to.
extern "C" __global__ void trap_if(int flag) {
  if (flag && threadIdx.x == 5) __trap();
}

#include <math_constants.h>
namespace fc {
extern __shared__ int ns_scope_dyn[];  // dynamic shared memory declared inside a namespace
}

// One thread: a sample of the math/bit intrinsics, written as floats.
extern "C" __global__ void intrinsics(const float* __restrict__ x, float* __restrict__ out) {
  static __shared__ float s;
  fc::ns_scope_dyn[0] = 7;
  s = __ldg(&x[0]);
  __syncthreads();
  out[0] = rsqrtf(s);                                  // x[0] = 4  -> 0.5
  out[1] = isnan(x[1]) ? 1.0f : 0.0f;                  // NaN       -> 1
  out[2] = x[2] == CUDART_INF_F ? 1.0f : 0.0f;         // inf       -> 1
  out[3] = -INFINITY < x[3] ? 1.0f : 0.0f;             // 0         -> 1
  out[4] = __int_as_float(__float_as_int(x[4]));       // 1.5       -> 1.5
  out[5] = __fmaf_rn(x[4], 2.0f, 1.0f) + fmaf(1.0f, 1.0f, 0.0f);  // -> 5
  out[6] = (float)min(3, max(-2, (int)x[5]));          // x[5] = 9  -> 3
  out[7] = fminf(x[4], 1.0f) + (float)fc::ns_scope_dyn[0];  // -> 8
}

// Two-argument __launch_bounds__: the harness must read the first (max threads), not the comma expression.
extern "C" __global__ void __launch_bounds__(64, 4) bounded_two_args(float* out) {
    out[threadIdx.x] = (float)threadIdx.x;
}
