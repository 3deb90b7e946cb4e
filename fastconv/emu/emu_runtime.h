// emu_runtime.h -- the fiber scheduler and launch entry of fastconv's CPU harness for CUDA kernels.
// Included once, after the kernel source, by the translation unit that fastconv.emu generates;
// that unit then declares one EMU_KERNEL(index, function, launch_bound) per kernel.
//
// One launch: for each block (in a seeded shuffled order) every thread becomes a fiber with its
// own 64 KiB stack (made by makecontext; started by swapcontext; afterwards switched with
// _setjmp/_longjmp, which unlike swapcontext make no signal-mask syscall: ~50x faster). A round runs every runnable fiber, in a freshly shuffled order, until it
// blocks at a barrier or returns. Between rounds the scheduler releases barriers:
//   * a warp intrinsic completes when every existing lane named in its mask waits at the same
//     kind of warp op with the same mask (the scheduler computes all lanes' results);
//   * __syncthreads completes when every thread of the block waits at the same __syncthreads.
// Anything else (threads exited while others wait, waits at different barriers, a warp op whose
// lanes went elsewhere) is reported as an error instead of hanging. Faults (SIGSEGV/SIGBUS/SIGFPE/
// SIGILL) during the launch jump back here and are reported; the caller never crashes.
#pragma once
#include <csetjmp>
#include <csignal>
#include <cstdarg>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <utility>
#include <vector>

extern "C" char __emu_shared_begin[] __attribute__((visibility("hidden")));  // from emu.ld
extern "C" char __emu_shared_end[] __attribute__((visibility("hidden")));

namespace emu {

enum : int { RUN, AT_BAR, AT_WARP, DONE };
enum : int { OK = 0, E_CONFIG = 1, E_FAULT = 2, E_SYNC = 3, E_TRAP = 4, E_ASYNC = 5 };
constexpr size_t kStack = 64 * 1024;
constexpr int kMaxThreads = 1024;

struct Result {          // mirrored by ctypes in fastconv/emu/__init__.py
  int code;              // OK / E_*
  int signo;             // for E_FAULT
  int is_write;          // for E_FAULT: 1 write, 0 read, -1 unknown
  int pad;
  unsigned long long addr;  // for E_FAULT: the faulting address
  char msg[1024];
};

struct Fiber {
  ucontext_t ctx;   // only to start the fiber
  jmp_buf jb;       // where it waits
  bool started;
  uint3 tid;
  int state;
  const char* file; int line;   // where it waits
  int op; unsigned mask; int arg, width;  // warp op (arg: the variant for W_MMA/W_LDSM)
  uint64_t val, res;            // posted value / result
  void* ptr;                    // W_MMA / W_LDSM: the lane's MmaArgs / LdsmArgs
  struct Copy { unsigned char* dst; unsigned char data[16]; int size; int group; };
  std::vector<Copy> copies;     // cp.async copies not yet completed by a wait_group
  int open_group;               // id of the cp.async group that the next commit closes
};

struct Launch {
  std::vector<Fiber> fib;
  int n = 0, cur = 0;
  ucontext_t sched;  // scratch for the starting swapcontext; never resumed
  jmp_buf sched_jb;  // the scheduler, waiting for the running fiber to block or finish
  void (*invoke)(void*, void**) = nullptr;
  void* fn = nullptr;
  void** args = nullptr;
  uint64_t rng = 0;
  Result* res = nullptr;
  sigjmp_buf jump;
};
inline Launch g_L;
inline size_t g_dyn_bytes;  // size of this launch's dynamic shared memory (16-byte rounded)
inline std::vector<char*> g_stacks;  // kept between launches; each has a PROT_NONE page below it
inline thread_local bool t_in_launch = false;
inline struct sigaction g_old_act[32];
constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};

inline uint64_t rnd() {  // splitmix64
  uint64_t z = (g_L.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull; z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
template <class T> void shuffle(std::vector<T>& v) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rnd() % i]);
}
inline void set_error(int code, const char* fmt, ...) {
  if (g_L.res->code) return;  // keep the first error
  g_L.res->code = code;
  va_list ap; va_start(ap, fmt);
  vsnprintf(g_L.res->msg, sizeof g_L.res->msg, fmt, ap);
  va_end(ap);
}
inline Fiber& me() { return g_L.fib[g_L.cur]; }
inline void wait(int) { if (!_setjmp(me().jb)) _longjmp(g_L.sched_jb, 1); }
[[noreturn]] inline void die_in_fiber() {  // abandon this fiber; the scheduler sees the error
  me().state = DONE;
  _longjmp(g_L.sched_jb, 1);
}
// No function-local statics in the runtime: emu.ld gathers those (.bss._ZZ*) as shared memory.
inline char g_tstr[3][48];
inline int g_tstr_k;
inline char g_altstack[64 * 1024];
inline const char* tstr(const uint3& t) {
  char* b = g_tstr[g_tstr_k = (g_tstr_k + 1) % 3];
  snprintf(b, sizeof g_tstr[0], "threadIdx=(%u,%u,%u)", t.x, t.y, t.z);
  return b;
}

// ---- called from kernel code (inside a fiber) -------------------------------------------------
int block_barrier(int pred, const char* file, int line) {
  Fiber& f = me();
  f.state = AT_BAR; f.file = file; f.line = line; f.val = pred;
  wait(AT_BAR);
  return (int)me().res;
}
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t val, int arg, int width, const char* file, int line) {
  Fiber& f = me();
  int lane = g_L.cur % 32;
  if (width < 1 || width > 32 || (width & (width - 1)))
    set_error(E_SYNC, "%s:%d: warp intrinsic width %d is not a power of two in [1, 32] (%s)", file, line, width, tstr(f.tid));
  else if (!(mask >> lane & 1u))
    set_error(E_SYNC, "%s:%d: warp intrinsic called by lane %d which is not in its mask 0x%08x (%s)", file, line, lane, mask, tstr(f.tid));
  if (g_L.res->code) die_in_fiber();
  f.state = AT_WARP; f.op = op; f.mask = mask; f.val = val; f.arg = arg; f.width = width; f.file = file; f.line = line;
  wait(AT_WARP);
  return me().res;
}
[[noreturn]] void trap(const char* what, const char* file, int line) {
  set_error(E_TRAP, "%s:%d: %s in %s, blockIdx=(%u,%u,%u)", file, line, what, tstr(me().tid), g_blockIdx.x, g_blockIdx.y, g_blockIdx.z);
  die_in_fiber();
}
// A warp-collective operation (mma.sync, ldmatrix): all 32 lanes post their arguments and wait;
// the last one to arrive triggers the computation (emu_tc.h) for the whole warp.
inline void warp_collective(WarpOp op, int variant, void* args, const char* file, int line) {
  Fiber& f = me();
  f.state = AT_WARP; f.op = op; f.mask = ~0u; f.val = 0; f.arg = variant; f.width = 32; f.ptr = args;
  f.file = file; f.line = line;
  wait(AT_WARP);
}
}  // namespace emu
#include "emu_tc.h"
namespace emu {

// ---- scheduler ---------------------------------------------------------------------------------
inline void fiber_main() {  // never returns: a finished fiber jumps back to the scheduler
  g_L.invoke(g_L.fn, g_L.args);
  g_L.fib[g_L.cur].state = DONE;
  _longjmp(g_L.sched_jb, 1);
}

// Try to complete the warp op that fiber i waits at: it completes when every existing lane named
// in its mask waits at the same kind of warp op with the same mask (and, for mma/ldmatrix, the same
// variant). On completion the lanes become runnable and are appended to `released`.
// Returns false after an error (a lane of the group exited, or lanes disagree on a collective).
inline bool try_release_warp(int i, std::vector<int>* released) {
  Fiber& f = g_L.fib[i];
  int base = i & ~31, nlanes = g_L.n - base < 32 ? g_L.n - base : 32;
  unsigned exist = nlanes == 32 ? ~0u : (1u << nlanes) - 1, group = f.mask & exist;
  const uint3& b = g_blockIdx;
  bool collective = f.op == W_MMA || f.op == W_LDSM;
  if (collective && nlanes < 32) {
    set_error(E_ASYNC, "%s:%d: %s needs all 32 lanes of a warp, but this warp of block (%u,%u,%u) has %d threads (%s)",
              f.file, f.line, f.op == W_MMA ? "mma.sync" : "ldmatrix", b.x, b.y, b.z, nlanes, tstr(f.tid));
    return false;
  }
  for (int l = 0; l < nlanes; ++l) {
    if (!(group >> l & 1u)) continue;
    Fiber& g = g_L.fib[base + l];
    if (g.state == DONE) {
      set_error(E_SYNC, "%s:%d: warp intrinsic (mask 0x%08x) names lane %d, which has exited (%s, blockIdx=(%u,%u,%u))",
                f.file, f.line, f.mask, l, tstr(f.tid), b.x, b.y, b.z);
      return false;
    }
    if (g.state != AT_WARP || g.mask != f.mask || g.op != f.op) return true;  // not all there yet
    if (collective && g.arg != f.arg) {
      set_error(E_ASYNC, "%s:%d and %s:%d: lanes of one warp issue different %s variants (%s, blockIdx=(%u,%u,%u))",
                f.file, f.line, g.file, g.line, f.op == W_MMA ? "mma.sync" : "ldmatrix", tstr(f.tid), b.x, b.y, b.z);
      return false;
    }
  }
  if (collective) {
    void* args[32];
    for (int l = 0; l < 32; ++l) args[l] = g_L.fib[base + l].ptr;
    if (f.op == W_MMA) mma_collective((MmaKind)f.arg, args);
    else ldmatrix_collective(f.arg, args);
  }
  unsigned ballot = 0;
  for (int l = 0; l < nlanes; ++l)
    if ((group >> l & 1u) && g_L.fib[base + l].val) ballot |= 1u << l;
  for (int l = 0; l < nlanes; ++l) {
    if (!(group >> l & 1u)) continue;
    Fiber& g = g_L.fib[base + l];
    int w = g.width, seg = l & ~(w - 1), src = l;
    switch (g.op) {
      case W_IDX: src = seg + ((unsigned)g.arg % w); break;
      case W_DOWN: src = (l - seg) + g.arg < w ? l + g.arg : l; break;
      case W_UP: src = (l - seg) >= g.arg ? l - g.arg : l; break;
      case W_XOR: src = l ^ g.arg; if (src >= seg + w) src = l; break;
      default: break;
    }
    switch (g.op) {
      case W_BALLOT: g.res = ballot; break;
      case W_ANY: g.res = ballot != 0; break;
      case W_ALL: g.res = ballot == group; break;
      case W_SYNC: case W_MMA: case W_LDSM: g.res = 0; break;
      default:  // reading a lane outside the group is undefined on the GPU: give garbage
        g.res = (src >= 0 && src < 32 && (group >> src & 1u)) ? g_L.fib[base + src].val : ~0ull;
    }
    g.state = RUN;
    if (released) released->push_back(base + l);
  }
  return true;
}

// At the end of a round (nothing runnable): complete any warp op still complete (none should be,
// as each completes when its last lane arrives) and report those that never can.
inline bool release_warps() {
  bool any = false;
  for (int i = 0; i < g_L.n; ++i) {
    if (g_L.fib[i].state != AT_WARP) continue;
    if (!try_release_warp(i, nullptr)) return false;
    any |= g_L.fib[i].state == RUN;
  }
  return any;
}

// Complete a __syncthreads if every thread waits at the same one; else report why it cannot.
inline bool release_block() {
  int waiting = 0, done = 0, warp = -1, first = -1, count = 0;
  for (int i = 0; i < g_L.n; ++i) {
    Fiber& f = g_L.fib[i];
    if (f.state == DONE) ++done;
    else if (f.state == AT_BAR) { ++waiting; if (first < 0) first = i; count += f.val != 0; }
    else if (f.state == AT_WARP && warp < 0) warp = i;
  }
  if (done == g_L.n) return false;
  const uint3& b = g_blockIdx;
  if (warp >= 0) {
    Fiber& f = g_L.fib[warp];
    set_error(E_SYNC, "%s:%d: divergent warp intrinsic: %s waits (mask 0x%08x) for lanes that are at a "
              "__syncthreads or another warp op (blockIdx=(%u,%u,%u); %d threads at __syncthreads, %d exited)",
              f.file, f.line, tstr(f.tid), f.mask, b.x, b.y, b.z, waiting, done);
    return false;
  }
  Fiber& f0 = g_L.fib[first];
  if (done) {
    set_error(E_SYNC, "%s:%d: divergent __syncthreads: reached by %d of %d threads of block (%u,%u,%u); "
              "the other %d exited (first waiting: %s)", f0.file, f0.line, waiting, g_L.n, b.x, b.y, b.z, done, tstr(f0.tid));
    return false;
  }
  for (int i = 0; i < g_L.n; ++i) {
    Fiber& f = g_L.fib[i];
    if (f.line != f0.line || (f.file != f0.file && strcmp(f.file, f0.file))) {
      set_error(E_SYNC, "divergent __syncthreads: %s waits at %s:%d but %s waits at %s:%d (block (%u,%u,%u))",
                tstr(f0.tid), f0.file, f0.line, tstr(f.tid), f.file, f.line, b.x, b.y, b.z);
      return false;
    }
  }
  for (auto& f : g_L.fib) { f.res = count; f.state = RUN; }
  return true;
}

inline void run_block(std::vector<int>& order, const ucontext_t& tmpl) {
  // Garbage in all shared memory: 0xFF bytes read as NaN (float/double) or -1 (ints).
  memset(__emu_shared_begin, 0xFF, __emu_shared_end - __emu_shared_begin);
  for (int i = 0; i < g_L.n; ++i) {
    Fiber& f = g_L.fib[i];
    unsigned bx = g_blockDim.x, by = g_blockDim.y;
    f.tid = uint3{i % bx, (i / bx) % by, i / (bx * by)};
    f.state = RUN; f.file = ""; f.line = 0; f.started = false;
    f.copies.clear(); f.open_group = 0; f.ptr = nullptr;
    f.ctx = tmpl;  // a copy of one getcontext (each getcontext is a syscall)
    f.ctx.uc_stack.ss_sp = g_stacks[i];
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<int> released;
  for (;;) {
    order.clear();
    for (int i = 0; i < g_L.n; ++i) if (g_L.fib[i].state == RUN) order.push_back(i);
    if (order.empty()) {
      if (release_warps()) continue;
      if (g_L.res->code || !release_block()) return;
      continue;
    }
    // A fresh shuffle of all runnable threads each round. A warp op releases its warp as soon as
    // its own lanes arrive and those lanes run on at once, ahead of threads that have not yet run
    // this round (warps drift apart as on a GPU): a warp op is no block barrier, so it cannot hide a
    // missing __syncthreads. (For a race "warp W writes, warp op, warp R reads" the read comes
    // first when R's last lane runs before W's last one: probability 1/2 per block for any order
    // that treats warps alike, which many blocks and seeds amplify. Running warps one by one was
    // measured no better for that race and worse for races without a warp op between.)
    shuffle(order);
    while (!order.empty()) {  // a stack: released lanes are pushed on top and run next
      int i = order.back();
      order.pop_back();
      Fiber& f = g_L.fib[i];
      if (f.state != RUN) continue;
      g_L.cur = i;
      g_threadIdx = f.tid;
      if (!_setjmp(g_L.sched_jb)) {
        if (f.started) _longjmp(f.jb, 1);
        f.started = true;
        swapcontext(&g_L.sched, &f.ctx);
      }
      if (g_L.res->code) return;
      if (f.state == AT_WARP) {
        released.clear();
        if (!try_release_warp(i, &released)) return;
        shuffle(released);
        order.insert(order.end(), released.begin(), released.end());
      }
    }
  }
}

inline void on_signal(int sig, siginfo_t* si, void* uc) {
  if (!t_in_launch) {  // not ours (another thread): put the old handler back and re-fault into it
    sigaction(sig, &g_old_act[sig], nullptr);
    return;
  }
  t_in_launch = false;
  Result* r = g_L.res;
  r->code = E_FAULT; r->signo = sig; r->addr = (unsigned long long)si->si_addr; r->is_write = -1;
#if defined(__x86_64__)
  if (sig == SIGSEGV) r->is_write = (((ucontext_t*)uc)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#endif
  siglongjmp(g_L.jump, 1);
}

// cfg: grid x,y,z, block x,y,z, dynamic shared bytes, seed.
inline int launch_impl(void* fn, void (*invoke)(void*, void**), long long bound, const long long* cfg,
                       void** args, Result* res) {
  memset(res, 0, sizeof *res);
  g_L.res = res;
  long long nthreads = cfg[3] * cfg[4] * cfg[5], smem = cfg[6];
  long long limit = bound > 0 && bound < kMaxThreads ? bound : kMaxThreads;
  for (int i = 0; i < 6; ++i)
    if (cfg[i] < 1) { set_error(E_CONFIG, "grid and block dimensions must be >= 1"); return res->code; }
  if (nthreads > limit || cfg[3] > 1024 || cfg[4] > 1024 || cfg[5] > 64) {
    set_error(E_CONFIG, "block (%lld,%lld,%lld) = %lld threads exceeds the limit of %lld threads per block%s",
              cfg[3], cfg[4], cfg[5], nthreads, limit, bound > 0 ? " (__launch_bounds__)" : "");
    return res->code;
  }
  if (cfg[0] * cfg[1] * cfg[2] > (1ll << 26)) {  // more would take hours; not a GPU limit
    set_error(E_CONFIG, "grid (%lld,%lld,%lld) has more blocks than the CPU harness runs (2^26)", cfg[0], cfg[1], cfg[2]);
    return res->code;
  }
  if (cfg[0] >= (1ll << 31) || cfg[1] > 65535 || cfg[2] > 65535 || smem < 0) {
    set_error(E_CONFIG, "invalid grid (%lld,%lld,%lld) or shared memory size", cfg[0], cfg[1], cfg[2]);
    return res->code;
  }
  const long page = sysconf(_SC_PAGESIZE);
  while ((long long)g_stacks.size() < nthreads) {  // a PROT_NONE page under each stack: overflow faults
    char* p = (char*)mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { set_error(E_CONFIG, "out of memory for fiber stacks"); return res->code; }
    mprotect(p, page, PROT_NONE);
    g_stacks.push_back(p + page);
  }
  // Dynamic shared memory ends (16-byte rounded) right at a PROT_NONE page.
  size_t dyn = (size_t)((smem + 15) & ~15ll), dyn_pages = (dyn + page - 1) / page;
  char* dyn_map = (char*)mmap(nullptr, (dyn_pages + 1) * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (dyn_map == MAP_FAILED) { set_error(E_CONFIG, "out of memory for shared memory"); return res->code; }
  mprotect(dyn_map + dyn_pages * page, page, PROT_NONE);
  g_dyn_smem = (unsigned char*)dyn_map + dyn_pages * page - dyn;
  g_dyn_bytes = dyn;

  g_L.fib.assign(nthreads, Fiber{});
  g_L.n = (int)nthreads; g_L.fn = fn; g_L.invoke = invoke; g_L.args = args;
  g_L.rng = (uint64_t)cfg[7] * 0x2545f4914f6cdd1dull + 12345;
  g_gridDim = dim3(cfg[0], cfg[1], cfg[2]);
  g_blockDim = dim3(cfg[3], cfg[4], cfg[5]);
  long long nblocks = cfg[0] * cfg[1] * cfg[2];
  std::vector<long long> blocks(nblocks);
  for (long long i = 0; i < nblocks; ++i) blocks[i] = i;
  shuffle(blocks);  // GPUs promise no block order either
  std::vector<int> order;
  order.reserve(nthreads);
  ucontext_t tmpl;
  getcontext(&tmpl);

  // Faults jump back here. The alternate stack lets the handler run even on a blown fiber stack.
  stack_t alt{}, old_alt{};
  alt.ss_sp = g_altstack; alt.ss_size = sizeof g_altstack;
  sigaltstack(&alt, &old_alt);
  struct sigaction sa{};
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (int s : kSignals) sigaction(s, &sa, &g_old_act[s]);
  t_in_launch = true;
  if (sigsetjmp(g_L.jump, 1) == 0) {
    for (long long b : blocks) {
      g_blockIdx = uint3{(unsigned)(b % cfg[0]), (unsigned)(b / cfg[0] % cfg[1]), (unsigned)(b / (cfg[0] * cfg[1]))};
      memset(g_dyn_smem, 0xFF, dyn);
      run_block(order, tmpl);
      if (res->code) break;
    }
  } else {  // arrived from on_signal: say which thread, and recognise our own guard pages
    int n = snprintf(res->msg, sizeof res->msg, "%s at address %#llx in %s, blockIdx=(%u,%u,%u)",
                     res->signo == SIGFPE ? "arithmetic exception (integer division by zero?)"
                     : res->signo == SIGILL ? "illegal instruction" : "memory fault",
                     res->addr, tstr(me().tid), g_blockIdx.x, g_blockIdx.y, g_blockIdx.z);
    char* a = (char*)res->addr;
    if (a >= dyn_map + dyn_pages * page && a < dyn_map + (dyn_pages + 1) * page)
      snprintf(res->msg + n, sizeof res->msg - n, ": out-of-bounds access %lld bytes past the end of dynamic shared memory (%lld bytes)",
               (long long)(a - (char*)g_dyn_smem - smem), smem);
    for (char* s : g_stacks)
      if (a >= s - page && a < s) snprintf(res->msg + n, sizeof res->msg - n, ": fiber stack overflow (stacks are %zu KiB)", kStack / 1024);
  }
  t_in_launch = false;
  for (int s : kSignals) sigaction(s, &g_old_act[s], nullptr);
  sigaltstack(&old_alt, nullptr);
  munmap(dyn_map, (dyn_pages + 1) * page);
  g_dyn_smem = nullptr;
  g_dyn_bytes = 0;
  g_L.fib.clear();
  return res->code;
}

// ---- typed entry points generated per kernel ------------------------------------------------------
template <class... A, size_t... I>
void call(void (*f)(A...), void** a, std::index_sequence<I...>) { f(*static_cast<std::decay_t<A>*>(a[I])...); }
template <class... A> void invoke(void* f, void** a) { call((void (*)(A...))f, a, std::index_sequence_for<A...>{}); }

// Parameter type code for the Python side: bits 0-7 size, 8-11 class (0 other, 1 signed int,
// 2 unsigned int, 3 float, 4 bool, 5 bfloat16), bit 12 pointer (then the fields describe the pointee), bit 13 const pointee.
template <class T> constexpr int value_code() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_void_v<U>) return 0;
  else if constexpr (std::is_same_v<U, bool>) return 4 << 8 | 1;
  else if constexpr (std::is_same_v<U, ::__half>) return 3 << 8 | 2;           // float16 arrays
  else if constexpr (std::is_same_v<U, ::__nv_bfloat16>) return 5 << 8 | 2;    // bfloat16 (bits) arrays
  else if constexpr (std::is_floating_point_v<U>) return 3 << 8 | (int)sizeof(U);
  else if constexpr (std::is_integral_v<U>) return (std::is_signed_v<U> ? 1 : 2) << 8 | (int)sizeof(U);
  else return sizeof(U) < 256 ? (int)sizeof(U) : 0;
}
template <class T> constexpr int param_code() {
  if constexpr (std::is_pointer_v<T>)
    return 1 << 12 | (std::is_const_v<std::remove_pointer_t<T>> ? 1 << 13 : 0) | value_code<std::remove_pointer_t<T>>();
  else return value_code<T>();
}
template <class... A> int launch(void (*f)(A...), long long bound, const long long* cfg, void** args, Result* r) {
  return launch_impl((void*)f, &invoke<A...>, bound, cfg, args, r);
}
template <class... A> int signature(void (*)(A...), int* out, int cap) {
  int codes[] = {param_code<std::decay_t<A>>()..., 0};
  for (int i = 0; i < (int)sizeof...(A) && i < cap; ++i) out[i] = codes[i];
  return (int)sizeof...(A);
}
}  // namespace emu

#define EMU_API extern "C" __attribute__((visibility("default")))
// The thread limit of __launch_bounds__(maxThreadsPerBlock[, minBlocksPerMultiprocessor[, ...]]).
template <typename... Rest>
constexpr long long emu_launch_bound(long long max_threads, Rest...) { return max_threads; }

#define EMU_KERNEL(idx, fn, bound)                                                                          \
  EMU_API int emu_launch_##idx(const long long* c, void** a, ::emu::Result* r) { return ::emu::launch(fn, bound, c, a, r); } \
  EMU_API int emu_signature_##idx(int* out, int cap) { return ::emu::signature(fn, out, cap); } \
  EMU_API long long emu_bound_##idx() { return bound; }
EMU_API int emu_result_size() { return (int)sizeof(::emu::Result); }
