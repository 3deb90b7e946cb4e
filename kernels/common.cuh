// common.cuh -- helpers shared by fastconv's CUDA kernels (plain CUDA C++, no torch headers).
//
// Every kernel file is compiled three ways from the same text: NVRTC at run time (through CuPy),
// nvcc in the CMake build (warnings as errors, ptxas register/spill report), and g++ against the
// CPU execution harness (fastconv/emu) for the tests. So: no host code, no libraries, only the
// device API the harness provides.
//
// Conventions
// * Tensors are contiguous 5-D (N, C, D, H, W); weights (K, C/groups, KD, KH, KW).
// * Scalars arrive as int32 (sizes, geometry) or int64 (element counts that can pass 2**31).
//   Every flat index is computed in 64-bit (`i64`): a tensor may hold more than 2**31 elements.
// * Kernels are `__global__` function templates over the element type T, launched by name
//   expression ("max_pool_forward<float>", as cupy.RawModule(name_expressions=...) does). Each .cu
//   lists what the host launches as FC_INSTANTIATE(<expression>) lines: nvcc compiles them as
//   explicit instantiations, and fastconv/cuda/loader.py reads the same lines as the name
//   expressions it gives NVRTC and the CPU harness -- one list for the three compilers.
// * T is float, double, __half or __nv_bfloat16; arithmetic is done in fc_acc<T> (float for the
//   16-bit types, as torch's "opmath"), reading with fc_load and rounding once with fc_store<T>.
#pragma once

#define FC_INSTANTIATE(...) template __global__ decltype(__VA_ARGS__) __VA_ARGS__;

typedef long long i64;

#define FC_BLOCK 256  // threads per block of the elementwise kernels (launch.py BLOCK)
// The block reductions (a fixed tree over partial[FC_BLOCK]) halve the block: a power of two.
static_assert(FC_BLOCK > 0 && (FC_BLOCK & (FC_BLOCK - 1)) == 0, "FC_BLOCK must be a power of two");

// __launch_bounds__ arguments. With the block size alone, ptxas (CUDA 13) aims at full occupancy
// and caps these kernels at 32-48 registers, spilling; minBlocksPerSM = 1 lets it use what the
// kernel needs (all stay under the 128-register budget, tools/check_ptxas.py).
#define FC_BOUNDS(threads) threads, 1

// The geometry of one convolution, normalised to 3 spatial dims (a 2-D conv has D = KD = OD = 1).
// `pd/ph/pw` is the padding before each dim; the padding after it is implied by the output size.
struct ConvGeom {
  int N, C, D, H, W;
  int K, KD, KH, KW;
  int OD, OH, OW;
  int sd, sh, sw;
  int pd, ph, pw;
  int dd, dh, dw;
  int groups;
};

// Kernel parameter list and the matching struct construction, so every conv entry point takes the
// same 22 int32 scalars in the same order (fastconv/cuda/conv.py builds them in this order).
#define CONV_PARAMS                                                                              \
  int N, int C, int D, int H, int W, int K, int KD, int KH, int KW, int OD, int OH, int OW,      \
      int sd, int sh, int sw, int pd, int ph, int pw, int dd, int dh, int dw, int groups
#define CONV_GEOM \
  ConvGeom { N, C, D, H, W, K, KD, KH, KW, OD, OH, OW, sd, sh, sw, pd, ph, pw, dd, dh, dw, groups }

// Pooling geometry over P = N*C independent planes (19 int32 scalars, fastconv/cuda/pool.py).
#define POOL_PARAMS                                                                              \
  int P, int D, int H, int W, int OD, int OH, int OW, int kd, int kh, int kw, int sd, int sh,    \
      int sw, int pd, int ph, int pw, int dd, int dh, int dw

__device__ __forceinline__ i64 fc_thread_start() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ i64 fc_thread_step() { return (i64)gridDim.x * blockDim.x; }

// +infinity without <math_constants.h> (NVRTC from the pip wheel has no CUDA include dir).
template <typename T> __device__ __forceinline__ T fc_inf();
template <> __device__ __forceinline__ float fc_inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double fc_inf<double>() {
  return __longlong_as_double(0x7ff0000000000000LL);
}

// 16-bit floats. NVRTC alone has no <cuda_fp16.h> (no CUDA include path, see tc.cuh), so on a GPU
// __half / __nv_bfloat16 are storage-only stand-ins holding the bits, converted with tc.cuh's cvt
// instructions (round to nearest even); the harness brings its own (fastconv/emu/emu_half.h), with
// the same rounding. A kernel never computes in them: fc_load -> fc_acc<T> -> fc_store<T>.
#if defined(FASTCONV_CUDA_EMU)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#else
struct __align__(2) __half { unsigned short __x; };
struct __align__(2) __nv_bfloat16 { unsigned short __x; };
#endif
#include "tc.cuh"

template <typename T> struct FcAcc { typedef T type; };
template <> struct FcAcc<__half> { typedef float type; };
template <> struct FcAcc<__nv_bfloat16> { typedef float type; };
template <typename T> using fc_acc = typename FcAcc<T>::type;

__device__ __forceinline__ float fc_load(float v) { return v; }
__device__ __forceinline__ double fc_load(double v) { return v; }
__device__ __forceinline__ float fc_load(__half v) { return float_from_f16_bits(v.__x); }
__device__ __forceinline__ float fc_load(__nv_bfloat16 v) { return float_from_bf16_bits(v.__x); }
template <typename T> __device__ __forceinline__ T fc_store(fc_acc<T> v) { return v; }
template <> __device__ __forceinline__ __half fc_store<__half>(float v) {
  __half r;
  r.__x = f16_bits_from_float(v);
  return r;
}
template <> __device__ __forceinline__ __nv_bfloat16 fc_store<__nv_bfloat16>(float v) {
  __nv_bfloat16 r;
  r.__x = bf16_bits_from_float(v);
  return r;
}

// NaN test that survives any math flags (v != v).
template <typename T> __device__ __forceinline__ bool fc_isnan(T v) { return v != v; }

// Flat index of a contiguous (N, C, D, H, W) tensor -> coordinates. One 64-bit division for the
// (n, c) part; the spatial part uses 32-bit arithmetic, which is safe because fastconv refuses
// planes (D*H*W) of 2**31 elements or more (the registry says so before any launch).
__device__ __forceinline__ void fc_unflatten(i64 idx, int C, int D, int H, int W, i64& n, int& c, int& d,
                                             int& h, int& w) {
  const int plane = D * H * W;
  const i64 nc = idx / plane;
  int s = (int)(idx - nc * plane);
  w = s % W; s /= W;
  h = s % H;
  d = s / H;
  c = (int)(nc % C);
  n = nc / C;
}

// The elementwise kernels' launch shape maps work, not planes (fastconv/cuda/launch.py plane_grid):
// * a plane of at least FC_BLOCK / 2 positions: grid.x (x blockDim.x threads) covers the positions
//   of one plane, grid.y strides over the N*C planes;
// * a smaller plane (a 7x7 feature map, the 1x1 output of global pooling): grid.x = 1 and the
//   blockDim.x threads of a block cover G = blockDim.x / PLANE whole planes, grid.y strides over
//   groups of G planes. Without this a 1x1 output would leave 255 of 256 threads idle.
// G is derived from the launch itself (threads per grid row / PLANE), so any grid is correct (the
// loops are grid-stride loops); the host's grid only decides how well the work is spread.
// The coordinates then need only 32-bit divisions (a 64-bit division is a subroutine call on the
// GPU, and registers live across it are spilled); every loop counter and element offset is 64-bit
// (a counter near 2**31 plus gridDim.y must not wrap). Needs N*C < 2**31 and D*H*W < 2**31
// (refused otherwise by the host code), so `nc` and `s` are exposed as int.
struct FcPlaneWalk {
  i64 nc0, nc_step;  // first plane of this thread, plane stride
  i64 s0, s_step;    // first position in the plane, position stride
  __device__ __forceinline__ explicit FcPlaneWalk(int plane) {
    const i64 row = (i64)gridDim.x * blockDim.x;  // threads per grid row
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= 2 * (i64)plane) {  // small planes: G whole planes per grid row
      const i64 G = row / plane, g = t / plane;  // once per thread: 64-bit is affordable here
      nc0 = (i64)blockIdx.y * G + g;
      nc_step = (i64)gridDim.y * G;
      s0 = g < G ? t - g * plane : plane;  // the last few threads of the row have no plane
      s_step = plane;                           // one position per plane and thread
    } else {
      nc0 = blockIdx.y;
      nc_step = gridDim.y;
      s0 = t;
      s_step = row;
    }
  }
};

#define FC_PLANE_LOOP(NC, PLANE, nc, s)                                                           \
  for (const FcPlaneWalk nc##_walk(PLANE), *nc##_once = &nc##_walk; nc##_once; nc##_once = nullptr) \
    for (i64 nc##_wide = nc##_walk.nc0; nc##_wide < (i64)(NC); nc##_wide += nc##_walk.nc_step)   \
      if (const int nc = (int)nc##_wide; true)                                                   \
        for (i64 s##_wide = nc##_walk.s0; s##_wide < (i64)(PLANE); s##_wide += nc##_walk.s_step) \
          if (const int s = (int)s##_wide; true)

__device__ __forceinline__ void fc_unflatten3(int s, int H, int W, int& d, int& h, int& w) {
  w = s % W; s /= W;
  h = s % H;
  d = s / H;
}

// A kernel written for exactly `threads` threads per block (shared arrays, thread -> tile maps)
// stops the launch if it gets another block size: the host's constant and the kernel's disagree.
// Uniform per block, so no thread is left waiting at a barrier.
#define FC_REQUIRE_BLOCK(threads) \
  do {                            \
    if (blockDim.x != (threads) || blockDim.y != 1 || blockDim.z != 1) __trap(); \
  } while (0)

