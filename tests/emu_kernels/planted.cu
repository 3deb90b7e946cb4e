// Planted bugs: each kernel is wrong in a way a GPU would show; the harness must report it.

// Off-by-one: reads x[n] (one past the end) in the last thread.
extern "C" __global__ void read_past_end(const float* __restrict__ x, float* __restrict__ y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i + 1] - x[i];  // should stop at n - 1
}

// Reads a shared tile it never wrote (only even threads store, every thread loads its neighbour).
extern "C" __global__ void read_unwritten_shared(float* __restrict__ y) {
  __shared__ float tile[64];
  int t = threadIdx.x;
  if (t % 2 == 0) tile[t] = 1.0f;
  __syncthreads();
  y[t] = tile[t ^ 1];
}

// Half the block waits at a barrier the other half never reaches.
extern "C" __global__ void divergent_barrier(float* __restrict__ y) {
  int t = threadIdx.x;
  if (t < 16) {
    __syncthreads();
    y[t] = 1.0f;
  }
}

// Scalar parameter: a Python float would arrive as a double.
extern "C" __global__ void scale(float* __restrict__ y, float alpha, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] *= alpha;
}

// Writes through a const pointer (cast away), and a dynamic-shared-memory overrun.
extern "C" __global__ void write_const(const float* __restrict__ x) {
  if (threadIdx.x == 0) const_cast<float*>(x)[0] = 1.0f;
}
extern "C" __global__ void dyn_shared_overrun(float* __restrict__ y, int n) {
  extern __shared__ float buf[];
  buf[threadIdx.x] = 1.0f;  // n floats were allocated, blockDim.x > n
  __syncthreads();
  y[threadIdx.x] = buf[threadIdx.x] * n;
}

// Planted: warp 1 writes shared memory, warp 0 reads it with no __syncthreads in between; with
// with_warp_op a shuffle (a warp-level barrier only) sits between the write and the read. The
// harness must catch the race either way: a warp op releases only its own warp.
extern "C" __global__ void race_across_warp_op(float* __restrict__ out, int with_warp_op) {
  __shared__ float s[32];
  const int t = threadIdx.x;   // 64 threads
  float v = (float)(blockIdx.x * 32 + (t % 32));
  if (t >= 32) s[t - 32] = v;
  if (with_warp_op) v = __shfl_sync(0xffffffffu, v, t % 32);
  if (t < 32) out[blockIdx.x * 32 + t] = s[t];   // missing __syncthreads() before this read
}
