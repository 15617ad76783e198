/*
 * cuda_sim.h -- how a GPU runs a kernel, modelled on the CPU, so that a CUDA file compiled as C++ runs anywhere.
 *
 * A launch `k<<<G, N>>>(args)` runs the function k once per thread: a grid of G blocks of N threads. A block's
 * threads run on one multiprocessor in warps of 32 lanes that step side by side; they share the block's `__shared__`
 * memory and meet at barriers: no thread passes `__syncthreads()` until every thread of its block has reached it.
 * A warp's lanes can read each other's registers (`__shfl_down_sync`) and vote (`__any_sync`), among those their
 * mask names. Blocks share only global memory (atomics), in any order. threadIdx, blockIdx, blockDim and gridDim
 * tell a thread who and where it is.
 *
 * Here blocks run one after another, and each thread of a block is a fiber (a stack of its own) on one CPU thread.
 * A thread runs until it reaches a barrier or a warp operation; then the scheduler picks the next, in the order
 * CUDA_SIM_SCHEDULE=name[:seed] names: in-order or reversed (round the threads, so warps interleave), shuffled, or
 * warp-greedy (one warp runs as far as the barriers let it before the next starts: the most adversarial legal
 * order between warps). A correct kernel gives one result under all, up to the float summation order of atomics;
 * a missing barrier gives a wrong one every time. Undefined behaviour is an error, never a hang: a barrier some
 * threads never reach, a warp operation called from outside its mask or waiting for a lane that has exited or is
 * elsewhere. CUDA_SIM_TRACE=b prints block b's timeline. Not modelled: 2-D/3-D launches, streams, fences, and the
 * undefined contents of fresh shared memory (a `__shared__` is a static here: it keeps the last block's values).
 * Users: splat_cuda_sim.cpp, tests/test_cuda_sim.py; a reading: docs/walkthrough.md 6.
 */
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>
#if !(defined(__x86_64__) && defined(__ELF__))
#include <ucontext.h>
#endif

// CUDA's keywords and built-ins, in plain C++.
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() ((void)::cuda_sim::barrier(1, __LINE__))
#define __syncthreads_count(predicate) ::cuda_sim::barrier(predicate, __LINE__)
#define __shfl_down_sync(mask, value, delta) ::cuda_sim::shfl_down(mask, value, delta, __LINE__)
#define __any_sync(mask, predicate) int(::cuda_sim::warp_op(::cuda_sim::ANY, mask, (predicate) != 0, 0, __LINE__))
struct uint3 { unsigned x, y, z; };  // the built-ins' type
using cudaStream_t = void*;           // streams are not modelled
inline uint3 threadIdx, blockIdx, blockDim, gridDim;
template <typename T> T min(T a, T b) { return b < a ? b : a; }
template <typename T> T max(T a, T b) { return a < b ? b : a; }
// A thread is switched out only at a barrier or warp operation, and blocks never overlap: a plain update is atomic.
template <typename T> T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
template <typename T> T atomicMax(T* p, T v) { const T old = *p; *p = std::max(old, v); return old; }

namespace cuda_sim {
// ----- fibers: a stack per thread, and a jump between stacks that keeps the callee-saved registers -------------
#if defined(__x86_64__) && defined(__ELF__)
struct Fiber { void* sp; };
extern "C" void cuda_sim_switch(void** save_sp, void* load_sp);  // a few ns (glibc's swapcontext makes a syscall)
asm(".pushsection .text\n.weak cuda_sim_switch\n.hidden cuda_sim_switch\n.type cuda_sim_switch,@function\n"
    "cuda_sim_switch:\n push %rbp\n push %rbx\n push %r12\n push %r13\n push %r14\n push %r15\n"
    " mov %rsp, (%rdi)\n mov %rsi, %rsp\n pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %rbx\n pop %rbp\n ret\n"
    ".popsection");
inline void start(Fiber& f, char* stack, size_t size, void (*entry)()) {  // the first jump "returns" into entry
  void** top = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15)) - 16);
  top[0] = reinterpret_cast<void*>(entry), top[1] = nullptr;  // where `ret` goes; a return address for entry
  f.sp = std::memset(top - 6, 0, 6 * sizeof(void*));            // below them, six registers to pop
}
inline void jump(Fiber& from, Fiber& to) { cuda_sim_switch(&from.sp, to.sp); }
#else  // elsewhere: portable, a hundred times slower
struct Fiber { ucontext_t context; };
inline void start(Fiber& f, char* stack, size_t size, void (*entry)()) {
  getcontext(&f.context), f.context.uc_stack = {stack, 0, size}, f.context.uc_link = nullptr;
  makecontext(&f.context, entry, 0);
}
inline void jump(Fiber& from, Fiber& to) { swapcontext(&from.context, &to.context); }
#endif

// ----- the block in flight, and what its threads call ----------------------------------------------------------
enum State { READY, AT_BARRIER, AT_WARP_OP, EXITED };
enum Op { BARRIER, SHFL_DOWN, ANY };
enum Schedule { IN_ORDER, REVERSED, SHUFFLED, WARP_GREEDY };
inline const char* const OP_NAMES[] = {"barrier", "__shfl_down_sync", "__any_sync"};  // barrier: __syncthreads[_count]
inline const char* const SCHEDULES[] = {"in-order", "reversed", "shuffled", "warp-greedy"};

// A thread: where it stopped (operation, source line), and that warp operation's arguments, operand and result (raw
// bits: a float, a double, an int or a predicate).
struct Thread { Fiber fiber; State state; Op op; int line; unsigned mask, delta; uint64_t value, result; };
struct Block {
  Schedule schedule;
  std::mt19937_64 rng;
  int n, n_warps, last = -1, greedy = 0, at_barrier = 0, count = 0, ended = 0;
  std::vector<Thread> threads;
  std::vector<uint32_t> ready, waiting, exited;  // per warp, a bit per lane
  std::vector<int> warp_order;                   // warp-greedy: the order in which warps take turns
  std::string error;
  Fiber scheduler;
  void (*body)(void*), *call;  // body(call) runs the kernel on its arguments
  bool trace = false;   // and the run of consecutive threads that stopped at one place:
  int run = 0, run_first = 0, run_line = 0, run_op = BARRIER;
};
inline Block* block = nullptr;  // the launch in flight (one at a time)

inline Thread& self() { return block->threads[threadIdx.x]; }
inline void fail(const std::string& why) { if (block->error.empty()) block->error = why; }
inline std::string str(long long n) { return std::to_string(n); }
inline std::string at(Op op, int line) { return std::string(OP_NAMES[op]) + " (line " + str(line) + ")"; }
inline uint64_t wait(State state, Op op, int line) {  // note where this thread stops; hand over to the scheduler
  self().state = state, self().op = op, self().line = line;
  return jump(self().fiber, block->scheduler), self().result;
}
inline int barrier(int pred, int line) { return self().value = pred != 0, int(wait(AT_BARRIER, BARRIER, line)); }
inline uint64_t warp_op(Op op, unsigned mask, uint64_t bits, unsigned delta, int line) {
  if (!(mask >> (threadIdx.x % 32) & 1u))
    fail("thread " + str(threadIdx.x) + " calls " + at(op, line) + " with a mask that leaves it out");
  self().mask = mask, self().value = bits, self().delta = delta;
  return wait(AT_WARP_OP, op, line);
}
template <typename T> T shfl_down(unsigned mask, T value, unsigned delta, int line) {
  static_assert(sizeof(T) <= 8, "a shuffle moves one register");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof value), bits = warp_op(SHFL_DOWN, mask, bits, delta, line);
  return std::memcpy(&value, &bits, sizeof value), value;
}

// ----- the scheduler -------------------------------------------------------------------------------------------
inline void trace(int t) {  // t < 0: flush. Consecutive lanes of one warp that stopped at one place make one line.
  Block& b = *block;
  const int line = t < 0 || b.threads[t].state == EXITED ? 0 : b.threads[t].line;
  if (b.run && (t < 0 || line != b.run_line || b.threads[t].op != b.run_op || t != b.run_first + b.run || !(t % 32))) {
    std::fprintf(stderr, "  warp %d lanes %2d-%2d ran to %s\n", b.run_first / 32, b.run_first % 32,
                 b.run_first % 32 + b.run - 1, b.run_line ? at(Op(b.run_op), b.run_line).c_str() : "the end");
    b.run = 0;
  }
  if (t >= 0 && !b.run++) b.run_first = t, b.run_line = line, b.run_op = b.threads[t].op;
}
inline void release(int t, uint64_t result) {  // thread t may run again; the operation it waited at returns result
  block->threads[t].state = READY, block->threads[t].result = result, block->ready[t / 32] |= 1u << (t % 32);
}
inline int pick() {  // the next thread to run, by the schedule; -1 if none can
  Block& b = *block;
  if (b.schedule == WARP_GREEDY)  // stay with one warp while it can run, then go to the next in warp_order
    for (int i = 0; i < b.n_warps; ++i, b.greedy = (b.greedy + 1) % b.n_warps)
      if (const int w = b.warp_order[b.greedy]; b.ready[w]) return 32 * w + __builtin_ctz(b.ready[w]);
  if (b.schedule == SHUFFLED) b.last = int(b.rng() % b.n);
  for (int step = 1; step <= b.n; ++step) {  // round the threads from the last one run, up (or down if reversed)
    const int t = ((b.last + (b.schedule == REVERSED ? -step : step)) % b.n + b.n) % b.n;
    if (b.ready[t / 32] >> (t % 32) & 1u) return t;
  }
  return -1;
}

// Thread t has stopped: complete the barrier or warp operation it was the last to reach, or say why it never will.
inline void stopped(int t) {
  Block& b = *block;
  const Thread& th = b.threads[t];
  const int w = t / 32;
  if (th.state == EXITED) ++b.ended, b.exited[w] |= 1u << (t % 32);
  for (uint32_t lanes = th.state == EXITED ? b.waiting[w] : 0; lanes; lanes &= lanes - 1)  // lanes that waited for t
    if (b.threads[w * 32 + __builtin_ctz(lanes)].mask >> (t % 32) & 1u) return stopped(w * 32 + __builtin_ctz(lanes));
  if (th.state == AT_BARRIER && (b.count += int(th.value), ++b.at_barrier == b.n)) {
    for (const Thread& u : b.threads)
      if (u.line != th.line) return fail("threads wait at two barriers, lines " + str(u.line) + " and " + str(th.line));
    if (b.trace) trace(-1), std::fprintf(stderr, "%s: all in, count %d\n", at(BARRIER, th.line).c_str(), b.count);
    for (int u = 0; u < b.n; ++u) release(u, uint64_t(b.count));
    b.at_barrier = b.count = 0;
  }
  if (th.state != AT_WARP_OP) return;
  b.waiting[w] |= 1u << (t % 32);
  if (const uint32_t gone = th.mask & b.exited[w])  // lanes past the block's last thread count as exited
    return fail(at(th.op, th.line) + " in warp " + str(w) + " waits for lane " + str(__builtin_ctz(gone)) +
                ", which has exited or does not exist");
  if ((b.waiting[w] & th.mask) != th.mask) return;  // a lane is not there yet
  uint64_t any = 0;
  for (uint32_t lanes = th.mask; lanes; lanes &= lanes - 1) {
    const Thread& u = b.threads[w * 32 + __builtin_ctz(lanes)];
    if (u.op != th.op || u.mask != th.mask || u.line != th.line)
      return fail("warp " + str(w) + "'s lanes meet at " + at(th.op, th.line) + " and " + at(u.op, u.line));
    any |= u.value;
  }
  for (uint32_t lanes = th.mask; lanes; lanes &= lanes - 1) {  // a shuffle from past lane 31 reads the lane's own
    const int lane = __builtin_ctz(lanes), src = lane + int(th.delta) > 31 ? lane : lane + int(th.delta);  // value,
    const uint64_t read = th.mask >> src & 1u ? b.threads[w * 32 + src].value : ~0ull;  // from outside the mask junk
    release(w * 32 + lane, th.op == ANY ? any : read);                                  // (all bits set: NaN, -1)
  }
  b.waiting[w] &= ~th.mask;
}
inline void deadlock() {  // nothing can run, yet some threads have not ended: say who waits where
  Block& b = *block;
  int t = 0;
  while (b.threads[t].state == EXITED) ++t;
  fail("deadlock in block " + str(blockIdx.x) + ": " + str(b.ended) + " of " + str(b.n) + " threads have exited, " +
       str(b.at_barrier) + " wait at a barrier" + (b.at_barrier && b.ended ? " (a divergent barrier)" : "") +
       "; thread " + str(t) + " waits at " + at(b.threads[t].op, b.threads[t].line));
}
inline void thread_main() { block->body(block->call), wait(EXITED, BARRIER, 0); }
inline void run_block(Block& b, char* stacks, size_t size) {
  b.last = b.schedule == REVERSED ? b.n : -1, b.at_barrier = b.count = b.ended = 0;
  std::fill(b.waiting.begin(), b.waiting.end(), 0u), std::fill(b.exited.begin(), b.exited.end(), 0u);
  if (b.n % 32) b.exited.back() = ~0u << (b.n % 32);
  for (int t = 0; t < b.n; ++t) start(b.threads[t].fiber, stacks + t * size, size, thread_main), release(t, 0);
  if (b.trace) std::fprintf(stderr, "block %u: %d threads, %s\n", blockIdx.x, b.n, SCHEDULES[b.schedule]);
  while (b.ended < b.n && b.error.empty()) {
    const int t = pick();
    if (t < 0) return deadlock();
    b.last = t, threadIdx = {unsigned(t), 0, 0}, b.ready[t / 32] &= ~(1u << (t % 32));
    jump(b.scheduler, b.threads[t].fiber);  // thread t runs to its next barrier, warp operation or end
    if (b.trace) trace(t);
    if (b.error.empty()) stopped(t);
  }
  if (b.trace) trace(-1);
}

// kernel<<<blocks, threads>>>(args...) on the CPU, in the order CUDA_SIM_SCHEDULE names (default in-order).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int blocks, int threads, cudaStream_t, Args... args) {
  // The built-ins and the __shared__ statics are global: one launch at a time (Python's GIL sees to it).
  constexpr int STACK = 64 << 10, MAX_THREADS = 1024;  // 64 KB per thread: many times what a kernel's frames need
  static const std::unique_ptr<char[]> stacks(new char[size_t(MAX_THREADS) * STACK]);  // pages touched on use
  if (threads < 1 || threads > MAX_THREADS || blocks < 0)
    throw std::invalid_argument("cuda-sim: cannot launch " + str(blocks) + " x " + str(threads));
  const char* env = std::getenv("CUDA_SIM_SCHEDULE");
  const std::string text = env && *env ? env : "in-order", name = text.substr(0, text.find(':'));
  const int schedule = int(std::find(SCHEDULES, SCHEDULES + 4, name) - SCHEDULES);
  const std::string seed = text.substr(std::min(text.size(), name.size() + 1));
  if (schedule == 4 || seed.find_first_not_of("0123456789") != std::string::npos)
    throw std::invalid_argument("CUDA_SIM_SCHEDULE: in-order, reversed, shuffled or warp-greedy, [:seed]; got " + text);
  Block b{Schedule(schedule), std::mt19937_64(std::strtoull(seed.c_str(), nullptr, 10)), threads, (threads + 31) / 32};
  b.threads.resize(threads), b.ready.resize(b.n_warps), b.waiting.resize(b.n_warps), b.exited.resize(b.n_warps);
  std::vector<int> order(blocks);
  for (int i = 0; i < blocks; ++i) order[i] = b.schedule == REVERSED ? blocks - 1 - i : i;
  for (int w = 0; w < b.n_warps; ++w) b.warp_order.push_back(w);
  if (b.schedule >= SHUFFLED)
    std::shuffle(order.begin(), order.end(), b.rng), std::shuffle(b.warp_order.begin(), b.warp_order.end(), b.rng);
  std::tuple<void (*)(Params...), Args...> call(kernel, args...);
  b.call = &call;
  b.body = [](void* c) { std::apply([](auto k, auto&... a) { k(a...); }, *static_cast<decltype(call)*>(c)); };
  const char* trace_block = std::getenv("CUDA_SIM_TRACE");
  gridDim = {unsigned(blocks), 1, 1}, blockDim = {unsigned(threads), 1, 1}, block = &b;
  for (size_t i = 0; i < order.size() && b.error.empty(); ++i) {
    blockIdx = {unsigned(order[i]), 0, 0}, b.trace = trace_block && *trace_block && std::atoi(trace_block) == order[i];
    run_block(b, stacks.get(), STACK);
  }
  block = nullptr;
  if (!b.error.empty()) throw std::runtime_error("cuda-sim: " + b.error);
}
}  // namespace cuda_sim
