// A dtype-generic kernel reached by name expression ("scale_shift<float>"), as kernels/*.cu are:
// a __global__ function template with __launch_bounds__, instantiated explicitly (as nvcc needs)
// and by the name expressions the module is built with (NVRTC, the harness).
#define TPL_BLOCK 64
#define TPL_INSTANTIATE(...) template __global__ decltype(__VA_ARGS__) __VA_ARGS__;

template <typename T>
__global__ void __launch_bounds__(TPL_BLOCK, 1) scale_shift(const T* __restrict__ x, T* __restrict__ y, T a, T b, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + b;
}
TPL_INSTANTIATE(scale_shift<float>)

// Only through a name expression: nothing in the source instantiates it.
template <typename T, int R>
__global__ void repeat_sum(const T* __restrict__ x, T* __restrict__ y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  T acc = T(0);
  for (int r = 0; r < R; ++r) acc += x[i];
  y[i] = acc;
}
