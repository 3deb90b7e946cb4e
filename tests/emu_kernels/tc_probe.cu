// Probe of the tensor-core instructions: the same kernels run on the CPU harness (fastconv.emu)
// and, when a GPU is available, on the GPU (tests/test_emu_harness.py compares them bit for bit).
//
// What the harness cannot know without a GPU and this probe checks:
//   ASSUMPTION (the one that needs hardware): mma.sync with .tf32 operands reads a register that
//   holds a full float32 (not passed through cvt.rna.tf32.f32) by ignoring its low 13 mantissa bits,
//   i.e. it truncates. probe_mma_tf32 with convert=0 feeds such values.
//   Also compared: cvt.rna.tf32.f32, cvt.rn.f16x2.f32, cvt.rn.bf16x2.f32 on ties, subnormals, NaN
//   and overflow; the fragment layouts (a wrong one moves whole values, not bits); and the float32
//   accumulation of the harness (exact products, one rounding) against the hardware's, on inputs
//   whose exact result is a float32, where both must agree.
//
// Every kernel takes the matrices row-major ((row, col) = (m, k) for A, (k, n) for B, (m, n) for
// C and D) and builds each lane's fragment words itself, following the PTX ISA layouts.
#include "tc.cuh"


// One block of 32 threads (one warp). A: 16x8 float32 bits, B: 8x8, C, D: 16x8.
// convert != 0: operands go through cvt.rna.tf32.f32 first; 0: the raw float32 bits.
extern "C" __global__ void probe_mma_tf32(const unsigned* A, const unsigned* B, const float* C, float* D, int convert) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  unsigned a[4] = {A[g * 8 + t], A[(g + 8) * 8 + t], A[g * 8 + t + 4], A[(g + 8) * 8 + t + 4]};
#ifdef WRONG_LAYOUT
  const unsigned swap = a[1]; a[1] = a[2]; a[2] = swap;   // planted: a1 and a2 exchanged
#endif
  unsigned b[2] = {B[t * 8 + g], B[(t + 4) * 8 + g]};
  if (convert) {
    for (int i = 0; i < 4; ++i) a[i] = tf32_from_float(__uint_as_float(a[i]));
    for (int i = 0; i < 2; ++i) b[i] = tf32_from_float(__uint_as_float(b[i]));
  }
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  mma_m16n8k8_tf32(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
}

// A: 16x16 and B: 16x8 16-bit words (f16 if bf16 == 0, else bf16), C, D: 16x8 float.
extern "C" __global__ void probe_mma_16bit(const unsigned short* A, const unsigned short* B, const float* C, float* D,
                                           int bf16) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  unsigned a[4], b[2];
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
    a[r] = (unsigned)A[row * 16 + col] | (unsigned)A[row * 16 + col + 1] << 16;
  }
#ifdef WRONG_LAYOUT
  const unsigned swap = a[1]; a[1] = a[2]; a[2] = swap;
#endif
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * t + 8 * r;
    b[r] = (unsigned)B[k * 8 + g] | (unsigned)B[(k + 1) * 8 + g] << 16;
  }
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  if (bf16) mma_m16n8k16_bf16(d, a, b, c);
  else mma_m16n8k16_f16(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
}

// out[5i..5i+4] for x[i]: tf32 bits; f16 | bf16 << 16 bits through the pair conversions; the same
// through the scalar ones; the f16 value back in float (bits); the bf16 value back in float (bits).
extern "C" __global__ void probe_cvt(const float* x, unsigned* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  unsigned* o = out + 5 * i;
  o[0] = tf32_from_float(x[i]);
  o[1] = (pack_half2(x[i], 0.0f) & 0xffffu) | (pack_bf16x2(0.0f, x[i]) & 0xffff0000u);
  const unsigned short h = f16_bits_from_float(x[i]), b = bf16_bits_from_float(x[i]);
  o[2] = (unsigned)h | (unsigned)b << 16;
  o[3] = __float_as_uint(float_from_f16_bits(h));
  o[4] = __float_as_uint(float_from_bf16_bits(b));
}

// ldmatrix: M holds four 8x8 matrices of 16-bit words (row-major, one after the other); they are
// copied to shared memory with rows padded to 24 words, then every variant is loaded:
// out[(variant * 32 + lane) * 4 + m], variants x1, x2, x4, x1.trans, x2.trans, x4.trans.
extern "C" __global__ void probe_ldmatrix(const unsigned short* M, unsigned* out) {
  __shared__ __align__(16) unsigned short tile[4 * 8][24];
  const int lane = threadIdx.x;
  for (int i = lane; i < 4 * 8 * 8; i += 32) tile[i / 8][i % 8] = M[i];
  __syncthreads();
  const void* row = &tile[lane][0];   // lane l gives row l % 8 of matrix l / 8
  unsigned r[4] = {0, 0, 0, 0};
  unsigned* o = out + lane * 4;
  ldmatrix_x1(r, row);       for (int m = 0; m < 1; ++m) o[0 * 128 + m] = r[m];
  ldmatrix_x2(r, row);       for (int m = 0; m < 2; ++m) o[1 * 128 + m] = r[m];
  ldmatrix_x4(r, row);       for (int m = 0; m < 4; ++m) o[2 * 128 + m] = r[m];
  ldmatrix_x1_trans(r, row); for (int m = 0; m < 1; ++m) o[3 * 128 + m] = r[m];
  ldmatrix_x2_trans(r, row); for (int m = 0; m < 2; ++m) o[4 * 128 + m] = r[m];
  ldmatrix_x4_trans(r, row); for (int m = 0; m < 4; ++m) o[5 * 128 + m] = r[m];
}
