// The host runtime behind cuda_emulation.h: the block scheduler (one fiber per CUDA thread),
// barriers, warp collectives, cp.async groups and the runtime API's error state.
#include "cuda_emulation.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace cnk_emu {

thread_local ThreadCoords* g_coords = nullptr;

namespace {

// ---- runtime state ---------------------------------------------------------------------------------
struct RuntimeState {
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
  DeviceProps device;
  std::map<const void*, int> max_dynamic_smem;  // per kernel, set by cudaFuncSetAttribute
  Schedule schedule = Schedule::kForward;
  std::uint64_t seed = 0;
  bool cp_async_eager = false;
  Stats stats;
  std::vector<LaunchRecord> launches;
};
RuntimeState& runtime() {
  static thread_local RuntimeState state;
  return state;
}

void record_error(cudaError_t err, const std::string& message) {
  RuntimeState& rt = runtime();
  if (rt.last_error == cudaSuccess) {  // the first error sticks, as on a device
    rt.last_error = err;
    rt.last_message = message;
  }
}

// ---- fiber contexts ----------------------------------------------------------------------------------
// On x86-64 a fiber switch saves the callee-saved registers on the fiber's stack and swaps stack
// pointers (a few ns); swapcontext also saves the signal mask with a system call at every switch,
// which made it half of the emulator's time. Other hosts use ucontext.
#if defined(__x86_64__) && defined(__GNUC__)
#define CNK_EMU_STACK_SWITCH 1
extern "C" void cnk_emu_stack_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl cnk_emu_stack_switch
  .hidden cnk_emu_stack_switch
  .type cnk_emu_stack_switch, @function
cnk_emu_stack_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cnk_emu_stack_switch, .-cnk_emu_stack_switch
)");
#endif

struct Context {
#ifdef CNK_EMU_STACK_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

void switch_context(Context& from, Context& to) {
#ifdef CNK_EMU_STACK_SWITCH
  cnk_emu_stack_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

// Prepares `c` to run entry() (which must never return) on the given stack.
void make_context(Context& c, char* stack, std::size_t bytes, void (*entry)()) {
#ifdef CNK_EMU_STACK_SWITCH
  // What cnk_emu_stack_switch pops: six registers, then entry as the return address; above it a
  // null return address for entry, placed so that entry starts with the ABI's stack alignment.
  auto top = reinterpret_cast<std::uintptr_t>(stack + bytes) & ~std::uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  c.sp = sp;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#endif
}

// ---- fibers -------------------------------------------------------------------------------------------
enum class Wait { kRunnable, kBarrier, kWarp, kDone };

enum class Collective {
  kNone, kShfl, kLdmatrix, kLdmatrixTrans, kMmaF16, kMmaBF16, kMmaTF32,
  // warpgroup collectives (128 threads)
  kWgmmaF16, kWgmmaBF16, kWgmmaCommit, kWgmmaWait,
};

bool is_warpgroup_collective(Collective c) {
  return c == Collective::kWgmmaF16 || c == Collective::kWgmmaBF16 || c == Collective::kWgmmaCommit ||
         c == Collective::kWgmmaWait;
}

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::kShfl: return "__shfl_xor_sync";
    case Collective::kLdmatrix: return "ldmatrix";
    case Collective::kLdmatrixTrans: return "ldmatrix.trans";
    case Collective::kMmaF16: return "mma.sync f16";
    case Collective::kMmaBF16: return "mma.sync bf16";
    case Collective::kMmaTF32: return "mma.sync tf32";
    case Collective::kWgmmaF16: return "wgmma.mma_async f16";
    case Collective::kWgmmaBF16: return "wgmma.mma_async bf16";
    case Collective::kWgmmaCommit: return "wgmma.commit_group";
    case Collective::kWgmmaWait: return "wgmma.wait_group";
    default: return "none";
  }
}

struct PendingCopy {
  void* dst;
  const void* src;  // null: zero-fill
};

struct Fiber {
  Context ctx;
  ThreadCoords coords;
  Wait wait = Wait::kRunnable;
  // Warp collective in progress: the lane's operands and results.
  Collective op = Collective::kNone;
  const void* in = nullptr;
  void* out = nullptr;
  int arg = 0;
  std::uint32_t regs[6] = {};  // ldmatrix address / mma operands / wgmma flags
  std::uint64_t desc[2] = {};  // wgmma matrix descriptors of A and B
  // cp.async: copies not yet landed, and the end index (into pending) of each committed group.
  std::vector<PendingCopy> pending;
  std::vector<std::size_t> group_ends;
};

struct GroupState {
  int arrived = 0;  // threads waiting at the current collective
  Collective op = Collective::kNone;
};

struct WarpState : GroupState {
  int lanes = 0;  // threads in this warp (the last warp of a block may be partial)
};

// One wgmma.mma_async, recorded at issue and run when its commit group is waited for.
struct WgmmaOp {
  bool bf16;
  int n;
  std::uint64_t desc_a, desc_b;
  bool scale_d, trans_a, trans_b;
  float* d[kWarpgroupSize];  // each thread's accumulator fragment
};

struct WarpgroupState : GroupState {
  std::vector<WgmmaOp> issued;                   // since the last commit
  std::deque<std::vector<WgmmaOp>> committed;    // oldest first, not yet retired by a wait
};

constexpr std::size_t kStackBytes = 256 * 1024;

struct Block {
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  std::vector<WarpgroupState> warpgroups;  // empty unless the block is whole warpgroups
  Context scheduler;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  char* smem = nullptr;
  std::size_t smem_bytes = 0;
  std::string fault;          // set by a fiber that hit an emulated device fault
  cudaError_t fault_code = cudaSuccess;
};
thread_local Block* g_block = nullptr;

// Stacks for the fibers of one block, with an inaccessible guard page below each, reused across
// launches.
struct StackPool {
  char* base = nullptr;
  std::size_t count = 0;
  std::size_t page = 0;
  char* stack(std::size_t i) { return base + i * (kStackBytes + page) + page; }
  void ensure(std::size_t n) {
    if (n <= count) return;
    release();
    page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    const std::size_t bytes = n * (kStackBytes + page);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base = static_cast<char*>(p);
    count = n;
    for (std::size_t i = 0; i < n; ++i) mprotect(stack(i) - page, page, PROT_NONE);
  }
  void release() {
    if (base) munmap(base, count * (kStackBytes + page));
    base = nullptr;
    count = 0;
  }
  ~StackPool() { release(); }
};
thread_local StackPool g_stacks;

Fiber& self() { return *g_block->current; }

void yield() { switch_context(self().ctx, g_block->scheduler); }

// A device fault: record it and park the fiber for good; the scheduler ends the launch.
[[noreturn]] void fault(cudaError_t code, const std::string& what) {
  Block& b = *g_block;
  if (b.fault.empty()) {
    const uint3 t = self().coords.thread_idx;
    std::ostringstream os;
    os << what << " (thread " << t.x << "," << t.y << "," << t.z << ")";
    b.fault = os.str();
    b.fault_code = code;
  }
  for (;;) {
    self().wait = Wait::kDone;
    yield();
  }
}

void fiber_entry() {
  (*g_block->body)();
  Fiber& f = self();
  f.pending.clear();  // copies a thread never waited for need not land (nothing reads them)
  f.wait = Wait::kDone;
  switch_context(f.ctx, g_block->scheduler);  // never resumed
}

int linear_tid(const ThreadCoords& c) {
  return static_cast<int>(c.thread_idx.x + c.block_dim.x * (c.thread_idx.y + c.block_dim.y * c.thread_idx.z));
}

bool in_smem(const void* p, std::size_t bytes) {
  const char* c = static_cast<const char*>(p);
  return c >= g_block->smem && c + bytes <= g_block->smem + g_block->smem_bytes;
}

// ---- warp collectives -----------------------------------------------------------------------------
std::uint16_t lo16(std::uint32_t v) { return static_cast<std::uint16_t>(v & 0xffffu); }
std::uint16_t hi16(std::uint32_t v) { return static_cast<std::uint16_t>(v >> 16); }
std::uint32_t pack16(std::uint16_t lo, std::uint16_t hi) { return lo | (static_cast<std::uint32_t>(hi) << 16); }

double operand_value(Collective op, std::uint16_t bits) {
  return op == Collective::kMmaF16 ? half_bits_to_float(bits) : bf16_bits_to_float(bits);
}

// Runs the collective for the lanes of one warp (lane i = lanes[i]); every lane has arrived.
void run_collective(Collective op, Fiber** lanes, int n) {
  switch (op) {
    case Collective::kShfl: {
      // Every lane of the warp arrives here (a lane that does not is a deadlock, reported as such),
      // so a member mask must name them all: a sub-warp shuffle is not modelled, and is refused.
      const std::uint32_t present = n == kWarpSize ? 0xffffffffu : (1u << n) - 1u;
      for (int i = 0; i < n; ++i)
        if ((lanes[i]->regs[0] & present) != present)
          fault(cudaErrorLaunchFailure, "__shfl_xor_sync: member mask does not name every lane of the warp");
      float vals[kWarpSize];
      for (int i = 0; i < n; ++i) vals[i] = *static_cast<const float*>(lanes[i]->in);
      for (int i = 0; i < n; ++i) {
        const int src = i ^ lanes[i]->arg;
        // Out-of-range source lane (partial warp): the lane keeps its own value, as on a GPU.
        *static_cast<float*>(lanes[i]->out) = src < n ? vals[src] : vals[i];
      }
      break;
    }
    case Collective::kLdmatrix:
    case Collective::kLdmatrixTrans: {
      // Four 8x8 matrices of 16-bit elements; lane 8j + r holds the address of row r of matrix j.
      std::uint16_t m[4][8][8];
      for (int j = 0; j < 4; ++j)
        for (int r = 0; r < 8; ++r) std::memcpy(m[j][r], lanes[8 * j + r]->in, 16);
      // Bank conflicts: one matrix (8 rows of 16 bytes) is one 128-byte shared-memory wavefront
      // when its rows fall in 8 distinct 16-byte bank groups; every repeat costs one more.
      Stats& st = runtime().stats;
      st.ldmatrix += 1;
      for (int j = 0; j < 4; ++j) {
        int per_group[8] = {};
        int worst = 0;
        for (int r = 0; r < 8; ++r) {
          const auto a = reinterpret_cast<std::uintptr_t>(lanes[8 * j + r]->in);
          worst = std::max(worst, ++per_group[(a / 16) % 8]);
        }
        st.ldmatrix_extra_wavefronts += static_cast<std::uint64_t>(worst - 1);
      }
      const bool trans = op == Collective::kLdmatrixTrans;
      for (int t = 0; t < n; ++t) {
        std::uint32_t* r = static_cast<std::uint32_t*>(lanes[t]->out);
        const int row = t / 4, col = 2 * (t % 4);
        for (int j = 0; j < 4; ++j)
          r[j] = trans ? pack16(m[j][col][row], m[j][col + 1][row]) : pack16(m[j][row][col], m[j][row][col + 1]);
      }
      break;
    }
    case Collective::kMmaF16:
    case Collective::kMmaBF16:
    case Collective::kMmaTF32: {
      runtime().stats.mma += 1;
      // D (16x8) = A (16xK) B (Kx8) + C with the PTX fragment layouts; g = lane / 4, c = lane % 4.
      const bool tf32 = op == Collective::kMmaTF32;
      const int K = tf32 ? 8 : 16;
      double A[16][16] = {}, B[16][8] = {};
      for (int lane = 0; lane < kWarpSize; ++lane) {
        const std::uint32_t* a = lanes[lane]->regs;  // a0..a3, b0, b1
        const int g = lane / 4, c = lane % 4;
        if (tf32) {
          // The tensor core reads 19 bits of each tf32 operand (sign, exponent, 10 mantissa bits).
          auto v = [](std::uint32_t u) { return static_cast<double>(bits_float(u & 0xffffe000u)); };
          A[g][c] = v(a[0]);
          A[g + 8][c] = v(a[1]);
          A[g][c + 4] = v(a[2]);
          A[g + 8][c + 4] = v(a[3]);
          B[c][g] = v(a[4]);
          B[c + 4][g] = v(a[5]);
        } else {
          for (int h = 0; h < 2; ++h) {
            const auto e = [&](std::uint32_t u) { return operand_value(op, h ? hi16(u) : lo16(u)); };
            A[g][2 * c + h] = e(a[0]);
            A[g + 8][2 * c + h] = e(a[1]);
            A[g][2 * c + 8 + h] = e(a[2]);
            A[g + 8][2 * c + 8 + h] = e(a[3]);
            B[2 * c + h][g] = e(a[4]);
            B[2 * c + 8 + h][g] = e(a[5]);
          }
        }
      }
      for (int lane = 0; lane < kWarpSize; ++lane) {
        float* d = static_cast<float*>(lanes[lane]->out);
        const int g = lane / 4, c = lane % 4;
        for (int i = 0; i < 4; ++i) {
          const int row = g + 8 * (i / 2), col = 2 * c + i % 2;
          double s = 0.0;
          for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
          d[i] = static_cast<float>(s + static_cast<double>(d[i]));
        }
      }
      break;
    }
    default:
      break;
  }
}

// ---- warpgroup collectives (wgmma) ---------------------------------------------------------------
// Decodes a no-swizzle wgmma matrix descriptor: start address, leading and stride byte offsets.
struct MatrixDescriptor {
  std::size_t start, lbo, sbo;
};
MatrixDescriptor decode_descriptor(std::uint64_t desc, const char* which) {
  if ((desc >> 62) != 0)
    fault(cudaErrorLaunchFailure, std::string("wgmma: descriptor of ") + which +
                                      " uses a swizzled layout; the emulator models the no-swizzle layout only");
  if (((desc >> 49) & 0x7u) != 0)
    fault(cudaErrorLaunchFailure, std::string("wgmma: descriptor of ") + which + " has a base offset (swizzle only)");
  return MatrixDescriptor{static_cast<std::size_t>(desc & 0x3fffu) << 4,
                          static_cast<std::size_t>((desc >> 16) & 0x3fffu) << 4,
                          static_cast<std::size_t>((desc >> 32) & 0x3fffu) << 4};
}

// Element (mn, k) of a 16-bit operand in the no-swizzle canonical layout: 8 x 16-byte core
// matrices; K-major: a core matrix is 8 mn rows of 8 consecutive k, LBO steps k by 8, SBO steps
// mn by 8; MN-major: a core matrix is 8 k rows of 8 consecutive mn, LBO steps k by 8, SBO steps
// mn by 8 (PTX ISA, "Shared Memory Matrix Layout", canonical layouts).
double wgmma_operand(const MatrixDescriptor& m, bool mn_major, int mn, int k, bool bf16) {
  const std::size_t core = static_cast<std::size_t>(mn / 8) * m.sbo + static_cast<std::size_t>(k / 8) * m.lbo;
  const std::size_t within = mn_major ? static_cast<std::size_t>((k % 8) * 16 + (mn % 8) * 2)
                                      : static_cast<std::size_t>((mn % 8) * 16 + (k % 8) * 2);
  const std::size_t byte = m.start + core + within;
  if (byte + 2 > g_block->smem_bytes)
    fault(cudaErrorIllegalAddress, "wgmma: operand element outside the block's shared memory");
  std::uint16_t bits;
  std::memcpy(&bits, g_block->smem + byte, 2);
  return bf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
}

// Runs one recorded wgmma: exact products, summed in double, rounded once into fp32 (as mma).
void run_wgmma(const WgmmaOp& op) {
  runtime().stats.wgmma += 1;
  const MatrixDescriptor ma = decode_descriptor(op.desc_a, "A");
  const MatrixDescriptor mb = decode_descriptor(op.desc_b, "B");
  static thread_local std::vector<double> A, B;
  A.assign(64 * 16, 0.0);
  B.assign(static_cast<std::size_t>(16 * op.n), 0.0);
  for (int m = 0; m < 64; ++m)
    for (int k = 0; k < 16; ++k) A[static_cast<std::size_t>(m * 16 + k)] = wgmma_operand(ma, op.trans_a, m, k, op.bf16);
  for (int n = 0; n < op.n; ++n)
    for (int k = 0; k < 16; ++k) B[static_cast<std::size_t>(k * op.n + n)] = wgmma_operand(mb, op.trans_b, n, k, op.bf16);
  for (int t = 0; t < kWarpgroupSize; ++t) {
    float* d = op.d[t];
    for (int i = 0; i < op.n / 2; ++i) {
      const int row = 16 * (t / 32) + (t % 32) / 4 + 8 * ((i / 2) % 2);
      const int col = 8 * (i / 4) + 2 * (t % 4) + i % 2;
      double s = 0.0;
      for (int k = 0; k < 16; ++k) s += A[static_cast<std::size_t>(row * 16 + k)] * B[static_cast<std::size_t>(k * op.n + col)];
      d[i] = static_cast<float>(s + (op.scale_d ? static_cast<double>(d[i]) : 0.0));
    }
  }
}

void run_warpgroup_collective(Collective op, WarpgroupState& w, Fiber** lanes) {
  Fiber& first = *lanes[0];
  switch (op) {
    case Collective::kWgmmaF16:
    case Collective::kWgmmaBF16: {
      WgmmaOp rec;
      rec.bf16 = op == Collective::kWgmmaBF16;
      rec.n = first.arg;
      rec.desc_a = first.desc[0];
      rec.desc_b = first.desc[1];
      rec.scale_d = first.regs[0] != 0;
      rec.trans_a = first.regs[1] != 0;
      rec.trans_b = first.regs[2] != 0;
      if (rec.n < 8 || rec.n > 256 || rec.n % 8 != 0) fault(cudaErrorLaunchFailure, "wgmma: invalid n");
      for (int t = 0; t < kWarpgroupSize; ++t) {
        const Fiber& f = *lanes[t];
        if (f.arg != rec.n || f.desc[0] != rec.desc_a || f.desc[1] != rec.desc_b || f.regs[0] != first.regs[0] ||
            f.regs[1] != first.regs[1] || f.regs[2] != first.regs[2])
          fault(cudaErrorLaunchFailure, "wgmma: operands differ across the warpgroup");
        rec.d[t] = static_cast<float*>(f.out);
      }
      decode_descriptor(rec.desc_a, "A");  // fault at the instruction, not later at the wait
      decode_descriptor(rec.desc_b, "B");
      w.issued.push_back(rec);
      break;
    }
    case Collective::kWgmmaCommit:
      w.committed.push_back(std::move(w.issued));
      w.issued.clear();
      break;
    case Collective::kWgmmaWait: {
      for (int t = 0; t < kWarpgroupSize; ++t)
        if (lanes[t]->arg != first.arg) fault(cudaErrorLaunchFailure, "wgmma.wait_group: counts differ across the warpgroup");
      while (w.committed.size() > static_cast<std::size_t>(first.arg)) {
        for (const WgmmaOp& rec : w.committed.front()) run_wgmma(rec);
        w.committed.pop_front();
      }
      break;
    }
    default:
      break;
  }
}

// Arrives at a warp or warpgroup collective; returns once it has run for the whole group.
void collective(Collective op) {
  Block& b = *g_block;
  Fiber& f = self();
  const int tid = linear_tid(f.coords);
  const bool warpgroup = is_warpgroup_collective(op);
  if (warpgroup && b.warpgroups.empty())
    fault(cudaErrorLaunchFailure, std::string(collective_name(op)) + " in a block that is not whole warpgroups");
  const int size = warpgroup ? kWarpgroupSize : kWarpSize;
  const std::size_t index = static_cast<std::size_t>(tid / size);
  GroupState& group = warpgroup ? static_cast<GroupState&>(b.warpgroups[index]) : b.warps[index];
  const int members = warpgroup ? kWarpgroupSize : b.warps[index].lanes;
  if (!warpgroup && op != Collective::kShfl && members != kWarpSize)
    fault(cudaErrorLaunchFailure, std::string(collective_name(op)) + " in a partial warp");
  if (group.arrived > 0 && group.op != op) {
    fault(cudaErrorLaunchFailure, std::string(warpgroup ? "warpgroup" : "warp") + " divergence: lanes at " +
                                      collective_name(group.op) + " and at " + collective_name(op));
  }
  f.op = op;
  group.op = op;
  if (++group.arrived < members) {
    f.wait = Wait::kWarp;
    yield();
    return;
  }
  // Last to arrive: run it for the group and release the others.
  Fiber* lanes[kWarpgroupSize];
  const int first = static_cast<int>(index) * size;
  for (int i = 0; i < members; ++i) lanes[i] = &b.fibers[static_cast<std::size_t>(first + i)];
  if (warpgroup) {
    run_warpgroup_collective(op, b.warpgroups[index], lanes);
  } else {
    run_collective(op, lanes, members);
  }
  for (int i = 0; i < members; ++i) {
    lanes[i]->op = Collective::kNone;
    if (lanes[i] != &f) lanes[i]->wait = Wait::kRunnable;
  }
  group.arrived = 0;
  group.op = Collective::kNone;
}

std::string describe_waits(const Block& b) {
  std::ostringstream os;
  int barrier = 0, done = 0;
  std::map<std::string, int> warp_ops;
  for (const Fiber& f : b.fibers) {
    if (f.wait == Wait::kBarrier) ++barrier;
    if (f.wait == Wait::kDone) ++done;
    if (f.wait == Wait::kWarp) ++warp_ops[collective_name(f.op)];
  }
  os << barrier << " threads at __syncthreads, " << done << " exited";
  for (const auto& [name, count] : warp_ops) os << ", " << count << " at " << name;
  return os.str();
}

std::string block_name(const char* kernel, uint3 bid) {
  std::ostringstream os;
  os << kernel << " block (" << bid.x << "," << bid.y << "," << bid.z << ")";
  return os.str();
}

// Runs one block to completion; returns false (error recorded) on a fault or a deadlock.
bool run_block(const char* name, const ThreadCoords& proto, int nthreads, std::vector<char>& smem,
               const std::function<void()>& body, std::mt19937_64& rng) {
  Block b;
  b.body = &body;
  b.smem = smem.data();
  b.smem_bytes = smem.size();
  std::fill(smem.begin(), smem.end(), static_cast<char>(0xff));  // poison: NaN in every float
  b.fibers.resize(static_cast<std::size_t>(nthreads));
  b.warps.resize(static_cast<std::size_t>((nthreads + kWarpSize - 1) / kWarpSize));
  for (std::size_t w = 0; w < b.warps.size(); ++w)
    b.warps[w].lanes = std::min(kWarpSize, nthreads - static_cast<int>(w) * kWarpSize);
  if (nthreads % kWarpgroupSize == 0) b.warpgroups.resize(static_cast<std::size_t>(nthreads / kWarpgroupSize));
  g_stacks.ensure(static_cast<std::size_t>(nthreads));
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = b.fibers[static_cast<std::size_t>(i)];
    f.coords = proto;
    f.coords.thread_idx = uint3{static_cast<unsigned>(i) % proto.block_dim.x,
                                (static_cast<unsigned>(i) / proto.block_dim.x) % proto.block_dim.y,
                                static_cast<unsigned>(i) / (proto.block_dim.x * proto.block_dim.y)};
    make_context(f.ctx, g_stacks.stack(static_cast<std::size_t>(i)), kStackBytes, fiber_entry);
  }
  std::vector<int> order(static_cast<std::size_t>(nthreads));
  for (int i = 0; i < nthreads; ++i) order[static_cast<std::size_t>(i)] = i;
  const Schedule schedule = runtime().schedule;
  if (schedule == Schedule::kReverse || schedule == Schedule::kGreedyReverse) std::reverse(order.begin(), order.end());
  const bool greedy = schedule == Schedule::kGreedy || schedule == Schedule::kGreedyReverse;

  Block* outer_block = g_block;
  ThreadCoords* outer_coords = g_coords;
  g_block = &b;
  bool ok = true;
  for (;;) {
    if (schedule == Schedule::kShuffle) std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (int i : order) {
      Fiber& f = b.fibers[static_cast<std::size_t>(i)];
      if (f.wait != Wait::kRunnable) continue;
      b.current = &f;
      g_coords = &f.coords;
      switch_context(b.scheduler, f.ctx);
      ran = true;
      if (!b.fault.empty() || greedy) break;  // greedy: rescan from the first thread in order
    }
    if (!b.fault.empty()) {
      record_error(b.fault_code, block_name(name, proto.block_idx) + ": " + b.fault);
      ok = false;
      break;
    }
    if (ran) continue;
    // Nothing runnable: done, a barrier to release, or a deadlock.
    int done = 0, barrier = 0;
    for (const Fiber& f : b.fibers) {
      done += f.wait == Wait::kDone;
      barrier += f.wait == Wait::kBarrier;
    }
    if (done == nthreads) break;
    if (barrier + done == nthreads) {  // exited threads count as arrived, as on the hardware
      for (Fiber& f : b.fibers)
        if (f.wait == Wait::kBarrier) f.wait = Wait::kRunnable;
      continue;
    }
    record_error(cudaErrorLaunchFailure,
                 block_name(name, proto.block_idx) + ": deadlock (divergent barrier or warp collective): " + describe_waits(b));
    ok = false;
    break;
  }
  g_block = outer_block;
  g_coords = outer_coords;
  return ok;
}

}  // namespace

// ---- public entry points ---------------------------------------------------------------------------------
Stats& stats() { return runtime().stats; }
std::vector<LaunchRecord>& launches() { return runtime().launches; }

void set_schedule(Schedule schedule, std::uint64_t seed) {
  runtime().schedule = schedule;
  runtime().seed = seed;
}

void set_cp_async_eager(bool eager) { runtime().cp_async_eager = eager; }

const DeviceProps& device_props() { return runtime().device; }

void set_device(const DeviceProps& props) {
  if (props.major < 1 || props.minor < 0 || props.max_dynamic_smem_optin < kDefaultDynamicSmem) {
    throw std::invalid_argument("set_device: compute capability must be at least 1.0 and the opt-in shared memory at "
                                "least 48 KiB");
  }
  runtime().device = props;
  runtime().max_dynamic_smem.clear();
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > runtime().device.max_dynamic_smem_optin) {
    record_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: more dynamic shared memory than the device has");
    return cudaErrorInvalidValue;
  }
  runtime().max_dynamic_smem[kernel] = bytes;
  return cudaSuccess;
}

void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, std::size_t dynamic_smem,
              const std::function<void()>& body) {
  const std::uint64_t threads = std::uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    record_error(cudaErrorInvalidConfiguration, std::string(name) + ": invalid launch configuration");
    return;
  }
  const auto it = runtime().max_dynamic_smem.find(kernel);
  const std::size_t allowed = it == runtime().max_dynamic_smem.end() ? kDefaultDynamicSmem : it->second;
  if (dynamic_smem > allowed) {
    record_error(cudaErrorInvalidValue, std::string(name) + ": " + std::to_string(dynamic_smem) +
                                            " bytes of dynamic shared memory, the kernel may use " +
                                            std::to_string(allowed));
    return;
  }
  runtime().launches.push_back(LaunchRecord{name, grid, block, dynamic_smem});
  std::vector<char> smem(dynamic_smem);
  std::mt19937_64 rng(runtime().seed);
  ThreadCoords proto{uint3{0, 0, 0}, uint3{0, 0, 0}, block, grid};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        proto.block_idx = uint3{x, y, z};
        runtime().stats.blocks += 1;
        if (!run_block(name, proto, static_cast<int>(threads), smem, body, rng)) return;
      }
}

void* dynamic_smem() { return g_block->smem; }

void syncthreads() {
  self().wait = Wait::kBarrier;
  yield();
}

float shfl_xor(unsigned member_mask, float v, int lane_mask) {
  Fiber& f = self();
  float out;
  f.in = &v;
  f.out = &out;
  f.arg = lane_mask & 31;  // the butterfly uses the low 5 bits (PTX shfl.bfly with c = 0x1f)
  f.regs[0] = member_mask;
  collective(Collective::kShfl);
  return out;
}

void ldmatrix_x4(std::uint32_t (&r)[4], const void* smem, bool trans) {
  if (reinterpret_cast<std::uintptr_t>(smem) % 16 != 0)
    fault(cudaErrorMisalignedAddress, "ldmatrix: row address not 16-byte aligned");
  if (!in_smem(smem, 16)) fault(cudaErrorIllegalAddress, "ldmatrix: row outside the block's shared memory");
  Fiber& f = self();
  f.in = smem;
  f.out = r;
  collective(trans ? Collective::kLdmatrixTrans : Collective::kLdmatrix);
}

void mma(MmaKind kind, float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  Fiber& f = self();
  for (int i = 0; i < 4; ++i) f.regs[i] = a[i];
  f.regs[4] = b0;
  f.regs[5] = b1;
  f.out = d;
  collective(kind == MmaKind::kF16 ? Collective::kMmaF16 : kind == MmaKind::kBF16 ? Collective::kMmaBF16
                                                                                   : Collective::kMmaTF32);
}

void wgmma(WgmmaKind kind, int n, float* d, std::uint64_t desc_a, std::uint64_t desc_b, bool scale_d, bool trans_a,
           bool trans_b) {
  Fiber& f = self();
  f.arg = n;
  f.out = d;
  f.desc[0] = desc_a;
  f.desc[1] = desc_b;
  f.regs[0] = scale_d;
  f.regs[1] = trans_a;
  f.regs[2] = trans_b;
  collective(kind == WgmmaKind::kF16 ? Collective::kWgmmaF16 : Collective::kWgmmaBF16);
}

void wgmma_commit_group() { collective(Collective::kWgmmaCommit); }

void wgmma_wait_group(int pending_groups) {
  self().arg = pending_groups;
  collective(Collective::kWgmmaWait);
}

std::size_t shared_window_address(const void* p) {
  if (!in_smem(p, 0)) fault(cudaErrorIllegalAddress, "cvta.to.shared of a pointer outside the block's shared memory");
  return static_cast<std::size_t>(static_cast<const char*>(p) - g_block->smem);
}

void cp_async_16(void* smem, const void* gmem, bool valid) {
  if (reinterpret_cast<std::uintptr_t>(smem) % 16 != 0 || (valid && reinterpret_cast<std::uintptr_t>(gmem) % 16 != 0))
    fault(cudaErrorMisalignedAddress, "cp.async: address not 16-byte aligned");
  if (!in_smem(smem, 16)) fault(cudaErrorIllegalAddress, "cp.async: destination outside the block's shared memory");
  if (runtime().cp_async_eager) {
    if (valid)
      std::memcpy(smem, gmem, 16);
    else
      std::memset(smem, 0, 16);
    return;
  }
  self().pending.push_back(PendingCopy{smem, valid ? gmem : nullptr});
}

void cp_async_commit() {
  Fiber& f = self();
  f.group_ends.push_back(f.pending.size());
}

void cp_async_wait(int newest_pending_groups) {
  Fiber& f = self();
  const std::size_t groups = f.group_ends.size();
  if (groups <= static_cast<std::size_t>(newest_pending_groups)) return;
  const std::size_t land_groups = groups - static_cast<std::size_t>(newest_pending_groups);
  const std::size_t land = f.group_ends[land_groups - 1];
  for (std::size_t i = 0; i < land; ++i) {
    const PendingCopy& c = f.pending[i];
    if (c.src)
      std::memcpy(c.dst, c.src, 16);
    else
      std::memset(c.dst, 0, 16);
  }
  f.pending.erase(f.pending.begin(), f.pending.begin() + static_cast<std::ptrdiff_t>(land));
  f.group_ends.erase(f.group_ends.begin(), f.group_ends.begin() + static_cast<std::ptrdiff_t>(land_groups));
  for (std::size_t& e : f.group_ends) e -= land;
}

}  // namespace cnk_emu

// ---- runtime API --------------------------------------------------------------------------------------
cudaError_t cudaGetLastError() {
  auto& rt = cnk_emu::runtime();
  const cudaError_t err = rt.last_error;
  rt.last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

// CUDA's description of the error, then what the emulator saw (cudaGetLastError has reset the
// code by the time CNK_CHECK_LAUNCH asks for the string, so the detail is kept until the next error).
const char* cudaGetErrorString(cudaError_t err) {
  const char* text = "unknown error";
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: text = "invalid argument"; break;
    case cudaErrorInvalidConfiguration: text = "invalid configuration argument"; break;
    case cudaErrorIllegalAddress: text = "an illegal memory access was encountered"; break;
    case cudaErrorMisalignedAddress: text = "misaligned address"; break;
    case cudaErrorLaunchFailure: text = "unspecified launch failure"; break;
  }
  static thread_local std::string message;
  message = std::string(text) + " (CUDA emulator: " + cnk_emu::runtime().last_message + ")";
  return message.c_str();
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = cnk_emu::device_props().major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = cnk_emu::device_props().minor; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = cnk_emu::device_props().max_dynamic_smem_optin;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
