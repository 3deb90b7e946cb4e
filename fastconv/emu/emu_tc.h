// emu_tc.h -- tensor cores (mma.sync), ldmatrix and cp.async for fastconv's CPU harness.
// Included by emu_runtime.h (it uses the scheduler's fibers); kernels reach these through
// kernels/tc.cuh, whose GPU branch is the inline PTX of the same instructions.
//
// Fragment layouts are those of the PTX ISA ("Matrix Fragments for mma.m16n8k8" and
// "mma.m16n8k16 with floating point type", "Warp-level matrix load instruction: ldmatrix"), with
//   groupID = laneid >> 2, threadID_in_group = laneid % 4 (g and t below):
//   m16n8k8 .tf32:  A a0 (g, t) a1 (g+8, t) a2 (g, t+4) a3 (g+8, t+4);  B b0 (k=t, n=g) b1 (k=t+4, n=g)
//   m16n8k16 .f16/.bf16 (two elements per 32-bit register, the lower-numbered in the low half):
//                   A reg r holds (g + 8*(r&1), 2t + 8*(r>>1) + {0,1});   B reg r holds (k = 2t + 8r + {0,1}, n = g)
//   C/D (both):     c_i at (g + 8*(i>>1), 2t + (i&1))
//
// Numerics (documented behaviour; see tests/emu_kernels/tc_probe.cu for what needs a GPU to confirm):
//   * products of tf32/f16/bf16 operands are exact; the k products and C are summed in double and
//     rounded once to float32 (round to nearest even). Hardware sums with float32-or-better precision
//     in an unspecified order; results may differ from it in the last bit or two.
//   * a .tf32 operand register holding a full float32 (not passed through cvt.rna.tf32.f32) is read
//     with its low 13 mantissa bits ignored, i.e. truncated toward zero. The ISA only says the
//     operand holds .tf32 data; truncation is the commonly documented behaviour of the hardware and
//     THE ASSUMPTION that needs a GPU to confirm (tc_probe.cu, test_probe_matches_the_gpu_bit_for_bit).
//     A NaN whose payload lies only in those bits is kept a NaN (not turned into Inf).
//   * cvt.rna.tf32.f32 (tf32_round): round to nearest, ties away from zero, low 13 bits cleared;
//     NaN -> 0x7fffffff; overflow rounds to Inf.
#pragma once
#include <cstring>

namespace emu {

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline uint32_t tf32_round(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffffffu;  // NaN: canonical
  if ((u & 0x7f800000u) == 0x7f800000u) return u;           // +-Inf
  return (u + 0x1000u) & ~0x1fffu;                          // ties away; a carry may reach Inf
}
inline double tf32_operand(uint32_t u) {                    // mma reads the top 19 bits
  if ((u & 0x7fffffffu) > 0x7f800000u) return (double)bits_to_float(0x7fffffffu);
  return (double)bits_to_float(u & ~0x1fffu);
}
inline double half_bits_to_double(uint16_t h) {
  int s = h >> 15, e = h >> 10 & 0x1f, m = h & 0x3ff;
  double v;
  if (e == 0x1f) v = m ? (double)NAN : (double)INFINITY;
  else if (e == 0) v = std::ldexp((double)m, -24);
  else v = std::ldexp((double)(m | 0x400), e - 25);
  return s ? -v : v;
}
inline double bf16_bits_to_double(uint16_t h) { return (double)bits_to_float((uint32_t)h << 16); }

inline double operand(MmaKind kind, uint32_t reg, int half) {
  uint16_t h = (uint16_t)(half ? reg >> 16 : reg & 0xffffu);
  return kind == MMA_M16N8K16_F16 ? half_bits_to_double(h) : bf16_bits_to_double(h);
}

inline void mma_collective(MmaKind kind, void** lanes) {
  double A[16][16], B[16][8], C[16][8];
  int K = kind == MMA_M16N8K8_TF32 ? 8 : 16;
  for (int l = 0; l < 32; ++l) {
    const MmaArgs& x = *(const MmaArgs*)lanes[l];
    int g = l >> 2, t = l & 3;
    if (kind == MMA_M16N8K8_TF32) {
      A[g][t] = tf32_operand(x.a[0]); A[g + 8][t] = tf32_operand(x.a[1]);
      A[g][t + 4] = tf32_operand(x.a[2]); A[g + 8][t + 4] = tf32_operand(x.a[3]);
      B[t][g] = tf32_operand(x.b[0]); B[t + 4][g] = tf32_operand(x.b[1]);
    } else {
      for (int r = 0; r < 4; ++r) {
        int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        A[row][col] = operand(kind, x.a[r], 0); A[row][col + 1] = operand(kind, x.a[r], 1);
      }
      for (int r = 0; r < 2; ++r) {
        int k = 2 * t + 8 * r;
        B[k][g] = operand(kind, x.b[r], 0); B[k + 1][g] = operand(kind, x.b[r], 1);
      }
    }
    for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = x.c[i];  // all C before any D (d may be c)
  }
  for (int l = 0; l < 32; ++l) {
    const MmaArgs& x = *(const MmaArgs*)lanes[l];
    int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      int m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
      double acc = C[m][n];
      for (int k = 0; k < K; ++k) acc += A[m][k] * B[k][n];
      x.d[i] = (float)acc;
    }
  }
}

inline bool in_shared(const void* p, size_t n) {
  const char* c = (const char*)p;
  if (c >= __emu_shared_begin && c + n <= __emu_shared_end) return true;
  const char* d = (const char*)g_dyn_smem;
  return d && c >= d && c + n <= d + g_dyn_bytes;
}

[[noreturn]] inline void async_error(const char* file, int line, const char* fmt, ...) {
  char what[256];
  va_list ap; va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  set_error(E_ASYNC, "%s:%d: %s (%s, blockIdx=(%u,%u,%u))", file, line, what, tstr(me().tid),
            g_blockIdx.x, g_blockIdx.y, g_blockIdx.z);
  die_in_fiber();
}

// variant: number of matrices (1, 2, 4) | 16 if .trans
inline void ldmatrix_collective(int variant, void** lanes) {
  int num = variant & 7;
  bool trans = variant & 16;
  for (int m = 0; m < num; ++m) {
    uint16_t M[8][8];
    for (int r = 0; r < 8; ++r) std::memcpy(M[r], ((const LdsmArgs*)lanes[8 * m + r])->addr, 16);
    for (int l = 0; l < 32; ++l) {
      int row = l >> 2, col = 2 * (l & 3);
      uint16_t lo = trans ? M[col][row] : M[row][col], hi = trans ? M[col + 1][row] : M[row][col + 1];
      ((const LdsmArgs*)lanes[l])->r[m] = (uint32_t)lo | (uint32_t)hi << 16;
    }
  }
}

void mma_sync(MmaKind kind, float* d, const uint32_t* a, const uint32_t* b, const float* c, const char* file, int line) {
  MmaArgs x{d, a, b, c};
  warp_collective(W_MMA, kind, &x, file, line);
}

void ldmatrix(int num, bool trans, uint32_t* r, const void* smem_row, const char* file, int line) {
  int lane = g_L.cur & 31;
  if (num != 1 && num != 2 && num != 4) async_error(file, line, "ldmatrix .x%d: only .x1, .x2 and .x4 exist", num);
  if (lane < 8 * num) {  // only these lanes' addresses are used
    if ((uintptr_t)smem_row % 16) async_error(file, line, "ldmatrix row address %p is not 16-byte aligned", smem_row);
    if (!in_shared(smem_row, 16)) async_error(file, line, "ldmatrix row address %p is not in shared memory", smem_row);
  }
  LdsmArgs x{r, smem_row};
  warp_collective(W_LDSM, num | (trans ? 16 : 0), &x, file, line);
}

void cp_async(void* dst, const void* src, int cp_size, int src_size, const char* file, int line) {
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) async_error(file, line, "cp.async of %d bytes: cp-size must be 4, 8 or 16", cp_size);
  if (src_size < 0 || src_size > cp_size) async_error(file, line, "cp.async src-size %d outside [0, %d]", src_size, cp_size);
  if ((uintptr_t)dst % cp_size) async_error(file, line, "cp.async destination %p is not aligned to the copy size (%d bytes)", dst, cp_size);
  if (src_size && (uintptr_t)src % cp_size) async_error(file, line, "cp.async source %p is not aligned to the copy size (%d bytes)", src, cp_size);
  if (!in_shared(dst, cp_size)) async_error(file, line, "cp.async destination %p is not in shared memory", dst);
  if (src_size && in_shared(src, src_size)) async_error(file, line, "cp.async source %p is shared memory, not global", src);
  Fiber& f = me();
  Fiber::Copy c{(unsigned char*)dst, {}, cp_size, f.open_group};
  std::memcpy(c.data, src, src_size);  // the read faults here, at the issuing line, if out of bounds
  std::memset(c.data + src_size, 0, cp_size - src_size);
  std::memset(dst, 0xFF, cp_size);     // poison until the wait: an early read sees NaN
  f.copies.push_back(c);
}

void cp_async_commit() { ++me().open_group; }

void cp_async_wait(int n, const char* file, int line) {
  if (n < 0) async_error(file, line, "cp.async.wait_group %d: N must be >= 0", n);
  Fiber& f = me();
  int done_below = f.open_group - n;   // groups [open_group - n, open_group) may stay pending
  size_t keep = 0;
  for (size_t i = 0; i < f.copies.size(); ++i) {
    Fiber::Copy& c = f.copies[i];
    if (c.group < done_below) std::memcpy(c.dst, c.data, c.size);
    else f.copies[keep++] = c;
  }
  f.copies.resize(keep);
}

}  // namespace emu
