// decode_probe: the decode rate of a MoE layer beside a read-bandwidth yardstick measured in alternation with
// it, for machines whose bandwidth moves within seconds (a shared VM: `kt bench` reads its yardstick before
// and after the decode loop, minutes apart).
//
//   bazel run -c opt //tools:decode_probe -- --format=int4 --shape=30b --threads=2 --iters=60
//
// Every iteration runs, back to back:
//   1. one decode call (qlen 1, top-k experts drawn to avoid the recent calls' experts) on one of several
//      layer copies (> 4x the last-level cache in all), timed;
//   2. the yardstick: a streaming read of as many bytes as that call's distinct experts hold, from a 1 GiB
//      buffer at an offset that advances every iteration (never cache-resident), by the same number of
//      threads, each reading its share as S interleaved streams, for S = 1, 2, 4, 8; each timed;
//   3. (--kernel) the same experts' projections called directly, whole matrices, one expert per thread in
//      turn, no pipeline: what the kernels reach without the scheduler.
// It prints the medians and the median of the per-iteration ratio decode / best yardstick of that
// iteration: each ratio compares two readings taken within milliseconds of each other.
#include <sched.h>
#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/expert_format.h"
#include "kt/moe/moe_layer.h"
#include "kt/moe/synthetic.h"
#include "kt/runtime/memory.h"
#include "kt/runtime/thread_pool.h"
#include "tools/bandwidth.h"
#include "tools/bench_stats.h"
#include "tools/isa_choice.h"

namespace kt {
namespace {

using tools::LastLevelCacheBytes;
using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::atomic<uint64_t> g_sink{0};

double Quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * v.size()))];
}
double Median(const std::vector<double>& v) { return Quantile(v, 0.5); }

struct Flags {
  std::string format_name = "int4", shape_name = "30b";
  int threads = 2, iters = 60, group = 128;
  bool kernel = false, ab = false;
  MoeTiling ab_tiling;
};

// False (after saying why) on an unknown flag.
bool ParseFlags(int argc, char** argv, Flags* f) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&](const char* pre) { return a.substr(std::strlen(pre)); };
    if (a.rfind("--format=", 0) == 0) f->format_name = val("--format=");
    else if (a.rfind("--shape=", 0) == 0) f->shape_name = val("--shape=");
    else if (a.rfind("--threads=", 0) == 0) f->threads = std::atoi(val("--threads=").c_str());
    else if (a.rfind("--iters=", 0) == 0) f->iters = std::atoi(val("--iters=").c_str());
    else if (a.rfind("--group-size=", 0) == 0) f->group = std::atoi(val("--group-size=").c_str());
    else if (a == "--kernel") f->kernel = true;
    else if (a.rfind("--ab=", 0) == 0) {
      f->ab = true;
      std::sscanf(a.c_str() + 5, "%d,%d", &f->ab_tiling.gate_up_panels, &f->ab_tiling.down_panels);
    } else {
      std::fprintf(stderr, "decode_probe: unknown flag %s\n", a.c_str());
      return false;
    }
  }
  return true;
}

// Copies of one random layer, enough to exceed 4x the last-level cache `llc` (the AMX host's is 300 MiB: one
// Qwen3-30B int4 layer would fit it).
absl::StatusOr<std::vector<std::unique_ptr<MoeLayer>>> MakeLayers(const MoeConfig& config, Isa isa,
                                                                  ExpertFormat format, double llc,
                                                                  ThreadPool& pool) {
  const size_t E = config.num_experts, H = config.hidden, I = config.intermediate, n = E * I * H;
  std::vector<bf16_t> gate(n), up(n), down(n);
  FillRandomBf16(pool, 1, n, 1.0f / std::sqrt(static_cast<float>(H)), gate.data());
  FillRandomBf16(pool, 2, n, 1.0f / std::sqrt(static_cast<float>(H)), up.data());
  FillRandomBf16(pool, 3, n, 1.0f / std::sqrt(static_cast<float>(I)), down.data());
  std::vector<std::unique_ptr<MoeLayer>> layers;
  double layer_bytes = 0;
  do {
    absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(config, isa, format);
    if (!moe.ok()) return moe.status();
    if (absl::Status s = (*moe)->LoadWeights(gate.data(), up.data(), down.data(), nullptr, pool); !s.ok()) return s;
    layer_bytes = static_cast<double>((*moe)->weight_bytes());
    layers.push_back(std::move(*moe));
  } while (layer_bytes * layers.size() < 4 * llc);
  return layers;
}

// Step 2: a streaming read of `bytes` from `buf` (at *offset, advanced), each thread its share (static split)
// as S interleaved streams for each S of kStreams; GB/s per S into ys, the best returned.
constexpr size_t kStreams[] = {1, 2, 4, 8};
double Yardstick(ThreadPool& pool, int threads, const uint8_t* buf, size_t buf_bytes, size_t* offset,
                 double bytes, double ys[4]) {
  const size_t share = (static_cast<size_t>(bytes) / threads) / 4096 * 4096;
  double best = 0;
  for (int si = 0; si < 4; ++si) {
    if (*offset + share * threads > buf_bytes) *offset = 0;
    const uint8_t* base = buf + *offset;
    *offset += share * threads;
    const Clock::time_point t0 = Clock::now();
    pool.ParallelFor(threads, [&](size_t t, int) {
      g_sink.fetch_add(tools::SumReadStreams(base + t * share, share, kStreams[si]), std::memory_order_relaxed);
    });
    ys[si] = share * threads / Since(t0) / 1e9;
    best = std::max(best, ys[si]);
  }
  return best;
}

// Step 3's inputs: a prepared row of x and of h (quantized where the format quantizes activations).
struct KernelInputs {
  std::vector<int8_t> qx, qh;
  std::vector<float> sx, sh;
  std::vector<int32_t> xs, hs;
  std::vector<bf16_t> hb;
  ProjInput inx, inh;

  KernelInputs(const PackedExperts& pe, const std::vector<bf16_t>& x, size_t H, size_t I)
      : qx(H + 64), qh(I + 64), sx(pe.ActivationGroups(ExpertProj::kGate)),
        sh(pe.ActivationGroups(ExpertProj::kDown)), xs(sx.size()), hs(sh.size()), hb(I, F32ToBf16(0.01f)) {
    if (pe.quantized_activations()) {
      pe.PrepareRow(ExpertProj::kGate, x.data(), qx.data(), sx.data(), xs.data());
      pe.PrepareRow(ExpertProj::kDown, hb.data(), qh.data(), sh.data(), hs.data());
      inx.qx = qx.data(); inx.sx = sx.data(); inx.xsum = xs.data(); inx.ld = H;
      inh.qx = qh.data(); inh.sx = sh.data(); inh.xsum = hs.data(); inh.ld = I;
    } else {
      inx.x = x.data(); inx.ld = H;
      inh.x = hb.data(); inh.ld = I;
    }
  }
};

// Step 3: the call's distinct experts' three matrices whole, column blocks split over the threads (192 rows
// of gate/up, 512 of down per task, so that every thread stays busy), no pipeline. Seconds of the first
// (cold) pass; *hot_seconds: the same again at once (L3-hot).
double KernelPass(ThreadPool& pool, const PackedExperts& pe, const Routing& r, const KernelInputs& in, size_t H,
                  size_t I, std::vector<float>& scratch, double* hot_seconds) {
  std::vector<int> ex(r.ids.begin(), r.ids.begin() + 8);
  std::sort(ex.begin(), ex.end());
  ex.erase(std::unique(ex.begin(), ex.end()), ex.end());
  const size_t gblk = 192, dblk = 512;
  const size_t gtasks = (I + gblk - 1) / gblk, dtasks = (H + dblk - 1) / dblk, per = 2 * gtasks + dtasks;
  double cold = 0;
  for (int pass = 0; pass < 2; ++pass) {
    const Clock::time_point t0 = Clock::now();
    pool.ParallelFor(ex.size() * per, [&](size_t task, int thread) {
      const int e = ex[task / per];
      const size_t tk = task % per;
      float* yo = scratch.data() + static_cast<size_t>(thread) * std::max(H, I);
      if (tk < 2 * gtasks) {
        const ExpertProj p = tk < gtasks ? ExpertProj::kGate : ExpertProj::kUp;
        const size_t c0 = (tk % gtasks) * gblk;
        pe.ProjectBlock(p, e, c0, std::min(gblk, I - c0), in.inx, 1, yo, I);
      } else {
        const size_t c0 = (tk - 2 * gtasks) * dblk;
        pe.ProjectBlock(ExpertProj::kDown, e, c0, std::min(dblk, H - c0), in.inh, 1, yo, H);
      }
    });
    (pass == 0 ? cold : *hot_seconds) = Since(t0);
  }
  return cold;
}

// Everything one run measures, one entry per timed iteration (GB/s unless named otherwise).
struct Samples {
  std::vector<double> cpu0, ctx, wall, hot, dec_quiet, dec_cpu, dec_b;
  std::vector<double> dec, ker, ratio, kratio, yard[4], yard_best;
};

void Report(const Flags& f, const char* format, const char* shape, Isa isa, int copies, double layer_bytes,
            double llc, double expert_bytes, const Samples& m) {
  std::printf("decode_probe: %s %s, %s path, %d threads, %d copies (%.0f MB; last-level cache %.0f MB), %d iterations, "
              "CPU %s\n", format, shape, IsaName(isa), f.threads, copies, layer_bytes * copies / 1e6, llc / 1e6,
              f.iters, GetCpuFeatures().brand.c_str());
  std::printf("  decode     median %.2f GB/s (%.0f us per call, %.1f MB); fast quartile (p75) %.2f GB/s\n",
              Median(m.dec), 8 * expert_bytes * 1e-3 / Median(m.dec), 8 * expert_bytes / 1e6, Quantile(m.dec, 0.75));
  std::printf("  decode, iterations without a context switch on thread 0 (%zu): median %.2f GB/s, by its cpu time %.2f GB/s\n",
              m.dec_quiet.size(), Median(m.dec_quiet), Median(m.dec_cpu));
  if (f.ab) {
    std::printf("  decode B   tiling %d,%d: median %.2f GB/s, p75 %.2f GB/s (A: median %.2f, p75 %.2f)\n",
                f.ab_tiling.gate_up_panels, f.ab_tiling.down_panels, Median(m.dec_b), Quantile(m.dec_b, 0.75),
                Median(m.dec), Quantile(m.dec, 0.75));
  }
  std::printf("  thread 0   median wall %.0f us, cpu %.0f us, context switches %.1f\n", 1e6 * Median(m.wall),
              1e6 * Median(m.cpu0), Median(m.ctx));
  if (f.kernel) {
    std::printf("  kernels    median %.2f GB/s (projections alone, no pipeline), p75 %.2f; again at once (L3-hot): %.2f GB/s\n",
                Median(m.ker), Quantile(m.ker, 0.75), Median(m.hot));
  }
  std::printf("  yardstick  median GB/s by streams per thread: 1: %.2f  2: %.2f  4: %.2f  8: %.2f; best per iteration %.2f (p75 %.2f)\n",
              Median(m.yard[0]), Median(m.yard[1]), Median(m.yard[2]), Median(m.yard[3]), Median(m.yard_best),
              Quantile(m.yard_best, 0.75));
  std::printf("  fast-quartile ratio (p75 decode / p75 best yardstick) %.1f%%\n",
              100 * Quantile(m.dec, 0.75) / Quantile(m.yard_best, 0.75));
  std::printf("  ratio      decode / best yardstick of the same iteration: median %.1f%% (p25 %.1f%%, p75 %.1f%%)\n",
              100 * Median(m.ratio), 100 * Quantile(m.ratio, 0.25), 100 * Quantile(m.ratio, 0.75));
  if (f.kernel) std::printf("  ratio      kernels / best yardstick: median %.1f%%\n", 100 * Median(m.kratio));
}

// The kernel on a block that stays in L2 (gate rows [0, 128) of expert 0: 128 * H weights), 200 calls, 3 times.
void L2HotKernel(const PackedExperts& pe, const KernelInputs& in, size_t H, size_t I, double expert_bytes,
                 std::vector<float>& scratch) {
  for (int rep = 0; rep < 3; ++rep) {
    const Clock::time_point t0 = Clock::now();
    for (int i = 0; i < 200; ++i) pe.ProjectBlock(ExpertProj::kGate, 0, 0, 128, in.inx, 1, scratch.data(), H);
    const double sec = Since(t0);
    std::printf("  L2-hot     gate block 128 x %zu of one expert, 200 calls: %.2f GB/s\n", H,
                200.0 * expert_bytes / 3 * 128 / I / sec / 1e9);
  }
}

// Whether the weights and the yardstick's buffer got huge pages (kt/runtime/memory.h advises them).
void ReportMemory() {
  if (FILE* f = std::fopen("/proc/self/smaps_rollup", "r")) {
    char line[256];
    while (std::fgets(line, sizeof(line), f)) {
      if (std::strncmp(line, "Rss:", 4) == 0 || std::strncmp(line, "AnonHugePages:", 14) == 0) {
        std::printf("  memory     %s", line);
      }
    }
    std::fclose(f);
  }
}

// Step 1 (and --ab's call under tiling B before it): one decode call on `layer`, timed with thread 0's cpu
// time and context switches. Records into m when `record`.
absl::Status TimedDecode(ThreadPool& pool, MoeLayer& layer, const Routing& r, const std::vector<bf16_t>& x,
                         std::vector<bf16_t>& y, double bytes, bool record, Samples* m, double* seconds) {
  timespec c0, c1;
  rusage u0, u1;
  getrusage(RUSAGE_THREAD, &u0);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
  const Clock::time_point t0 = Clock::now();
  absl::Status s = layer.Forward(pool, 1, 8, r.ids.data(), r.weights.data(), x.data(), y.data(), nullptr);
  *seconds = Since(t0);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
  getrusage(RUSAGE_THREAD, &u1);
  if (record) {
    m->cpu0.push_back((c1.tv_sec - c0.tv_sec) + 1e-9 * (c1.tv_nsec - c0.tv_nsec));
    m->ctx.push_back(u1.ru_nivcsw - u0.ru_nivcsw + u1.ru_nvcsw - u0.ru_nvcsw);
    m->wall.push_back(*seconds);
    if (m->ctx.back() == 0) {
      m->dec_quiet.push_back(bytes / *seconds / 1e9);
      m->dec_cpu.push_back(bytes / m->cpu0.back() / 1e9);
    }
  }
  return s;
}

int Run(int argc, char** argv) {
  Flags f;
  if (!ParseFlags(argc, argv, &f)) return 2;
  absl::StatusOr<ExpertFormat> format = ParseExpertFormat(f.format_name);
  if (!format.ok()) {
    std::fprintf(stderr, "decode_probe: %s\n", std::string(format.status().message()).c_str());
    return 2;
  }
  const bool big = f.shape_name == "235b";
  MoeConfig config;
  config.num_experts = 128;
  config.top_k = 8;
  config.hidden = big ? 4096 : 2048;
  config.intermediate = big ? 1536 : 768;
  config.max_len = 8;
  config.group_size = f.group;
  const absl::StatusOr<Isa> isa_or = tools::SelectIsa();
  if (!isa_or.ok()) return 2;
  const Isa isa = *isa_or;
  const int threads = f.threads, iters = f.iters;
  ThreadPool pool(ThreadPoolOptions{threads, false});
  const size_t E = config.num_experts, H = config.hidden, I = config.intermediate;
  const double llc = LastLevelCacheBytes() > 0 ? static_cast<double>(LastLevelCacheBytes()) : 32.0 * (1 << 20);
  absl::StatusOr<std::vector<std::unique_ptr<MoeLayer>>> made = MakeLayers(config, isa, *format, llc, pool);
  if (!made.ok()) {
    std::fprintf(stderr, "decode_probe: %s\n", made.status().ToString().c_str());
    return 1;
  }
  std::vector<std::unique_ptr<MoeLayer>>& layers = *made;
  const double layer_bytes = static_cast<double>(layers[0]->weight_bytes());
  const double expert_bytes = layer_bytes / E;
  const int copies = static_cast<int>(layers.size());

  const size_t buf_bytes = std::max<size_t>(size_t{1} << 30, static_cast<size_t>(8 * llc));
  uint8_t* buf = static_cast<uint8_t*>(AllocateArray(buf_bytes));
  pool.ParallelFor(threads, [&](size_t t, int) {
    std::memset(buf + t * (buf_bytes / threads), static_cast<int>(t + 1), buf_bytes / threads);
  });

  // Routings that avoid the experts of the calls that read 2x the cache before each.
  std::mt19937_64 rng(5);
  const int warmup = 3;
  const int window = static_cast<int>(std::ceil(2 * llc / (8 * expert_bytes * copies)));
  std::vector<Routing> routings = CacheAvoidingRoutings(rng, 2 * (iters + warmup), 1, 8, 128, copies, window);
  std::vector<bf16_t> x(H), y(H);
  for (size_t i = 0; i < H; ++i) x[i] = F32ToBf16(std::sqrt(3.0f) * UniformSym(Mix(9), i));
  const KernelInputs kin(layers[0]->experts(), x, H, I);
  std::vector<float> scratch(static_cast<size_t>(threads) * std::max(H, I));

  size_t offset = 0;
  Samples m;
  for (int it = -warmup; it < iters; ++it) {
    double sec = 0;
    if (f.ab) {
      // The same kind of call under tiling B (MoeTiling, bit-identical results), on the next routing.
      const Routing& rb = routings[iters + 2 * warmup + it];
      MoeLayer& lb = *layers[(it + warmup + 1) % copies];
      (void)lb.SetTiling(f.ab_tiling);
      Samples ignored;
      (void)TimedDecode(pool, lb, rb, x, y, 0, false, &ignored, &sec);
      (void)lb.SetTiling(MoeTiling{});
      if (it >= 0) m.dec_b.push_back(rb.distinct_experts * expert_bytes / sec / 1e9);
    }
    const Routing& r = routings[it + warmup];
    MoeLayer& layer = *layers[(it + warmup) % copies];
    const double bytes = r.distinct_experts * expert_bytes;
    if (absl::Status s = TimedDecode(pool, layer, r, x, y, bytes, it >= 0, &m, &sec); !s.ok()) {
      std::fprintf(stderr, "decode_probe: %s\n", s.ToString().c_str());
      return 1;
    }
    double ys[4];
    const double best = Yardstick(pool, threads, buf, buf_bytes, &offset, bytes, ys);
    double ksec = 0, hot = 0;
    if (f.kernel) ksec = KernelPass(pool, layer.experts(), r, kin, H, I, scratch, &hot);
    if (it < 0) continue;
    m.dec.push_back(bytes / sec / 1e9);
    for (int si = 0; si < 4; ++si) m.yard[si].push_back(ys[si]);
    m.yard_best.push_back(best);
    m.ratio.push_back(bytes / sec / 1e9 / best);
    if (f.kernel) {
      m.hot.push_back(bytes / hot / 1e9);
      m.ker.push_back(bytes / ksec / 1e9);
      m.kratio.push_back(bytes / ksec / 1e9 / best);
    }
  }
  Report(f, ExpertFormatName(*format), big ? "Qwen3-235B-A22B" : "Qwen3-30B-A3B", isa, copies, layer_bytes, llc,
         expert_bytes, m);
  if (f.kernel) L2HotKernel(layers[0]->experts(), kin, H, I, expert_bytes, scratch);
  ReportMemory();
  std::free(buf);
  return 0;
}

}  // namespace
}  // namespace kt

int main(int argc, char** argv) { return kt::Run(argc, argv); }
