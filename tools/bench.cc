#include "tools/bench.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kt/io/arch.h"
#include "kt/io/hf_int4.h"
#include "kt/io/layer_experts.h"
#include "kt/io/manifest.h"
#include "kt/io/method.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/expert_format.h"
#include "kt/moe/layer_loader.h"
#include "kt/moe/moe_reference.h"
#include "kt/moe/synthetic.h"
#include "kt/runtime/thread_pool.h"
#include "tools/bandwidth.h"
#include "tools/bench_stats.h"
#include "tools/isa_choice.h"
#include "tools/parallel.h"
#include "tools/peak.h"
#include "tools/torch_yardstick.h"

namespace kt {
namespace tools {

const std::vector<BenchShape>& BenchShapes() {
  static const std::vector<BenchShape>* shapes = new std::vector<BenchShape>{
      {"qwen3-30b-a3b", 128, 8, 2048, 768, 48},
      {"qwen3-235b-a22b", 128, 8, 4096, 1536, 94},
  };
  return *shapes;
}

namespace {

constexpr int kExitUsage = 2;
constexpr int kAccuracyQlen = 7;
constexpr double kAccuracyTolerance = 1e-2;

// What is measured, fixed before any weight is allocated.
struct BenchPlan {
  BenchShape shape;
  Isa isa = Isa::kScalar;
  ExpertFormat format = ExpertFormat::kBf16;
  std::string method;  // --weights: the KTMoEWrapper method the layer is loaded with
  MoeConfig config;
  double expert_bytes = 0;  // one expert's weights; the packed size (scales included) once loaded
  double flop_per_routed_row = 0;
};

// The yardsticks, measured in the same run as kt.
struct Yardsticks {
  BandwidthResult bandwidth;
  PeakResult peak;
  bool int_kernels = false;  // quantized experts: the int8 instructions' peak
  const char* peak_unit = "TFLOPS";
};

absl::StatusOr<BenchPlan> PlanSynthetic(const BenchFlags& flags, Isa isa) {
  BenchPlan plan;
  plan.shape = flags.shape;
  plan.isa = isa;
  plan.format = flags.format;
  plan.config.group_size = flags.group_size;
  return plan;
}

// The shape from the folder's config.json; the method from --method, else the converted folder's manifest,
// else BF16.
absl::StatusOr<BenchPlan> PlanFromFolder(const BenchFlags& flags, Isa isa) {
  absl::StatusOr<MoeArch> arch = LoadMoeConfig(flags.weights);
  if (!arch.ok()) return arch.status();
  BenchPlan plan;
  plan.isa = isa;
  plan.method = flags.method;
  if (plan.method.empty()) {
    plan.method = "BF16";
    if (access(absl::StrCat(flags.weights, "/", kManifestName).c_str(), F_OK) == 0) {
      absl::StatusOr<Manifest> manifest = ReadManifest(flags.weights);
      if (!manifest.ok()) return manifest.status();
      plan.method = manifest->method;
    }
  }
  absl::StatusOr<MethodLayout> layout = LayoutOfMethod(plan.method, flags.group_size);
  if (!layout.ok()) return layout.status();
  plan.format = ExpertFormatOfLayout(*layout);
  plan.shape = {absl::StrCat(arch->architecture, " from ", flags.weights),
                arch->num_experts,
                arch->top_k,
                arch->hidden,
                arch->intermediate,
                static_cast<int>(arch->moe_layers.size())};
  plan.config.group_size = layout->spec.group_size > 0 ? layout->spec.group_size : flags.group_size;
  return plan;
}

void FinishPlan(const BenchFlags& flags, BenchPlan* plan) {
  const BenchShape& s = plan->shape;
  plan->config.num_experts = s.experts;
  plan->config.top_k = s.top_k;
  plan->config.hidden = s.hidden;
  plan->config.intermediate = s.intermediate;
  plan->config.max_len = std::max({flags.qlen_decode, flags.qlen_prefill, kAccuracyQlen});
  // Bytes per expert; replaced by the packed size (scales included) once a layer is loaded.
  const double bytes_per_weight = plan->format == ExpertFormat::kBf16  ? sizeof(bf16_t)
                                  : plan->format == ExpertFormat::kInt8 ? 1.0
                                                                        : 0.5;
  plan->expert_bytes = 3.0 * s.hidden * s.intermediate * bytes_per_weight;
  plan->flop_per_routed_row = 2.0 * 3.0 * s.hidden * s.intermediate;
}

void PrintHeader(const BenchFlags& flags, const BenchPlan& plan) {
  const CpuFeatures& features = GetCpuFeatures();
  const BenchShape& s = plan.shape;
  const char* format = ExpertFormatName(plan.format);
  std::printf("kt bench: %s routed experts of one MoE layer\n", format);
  std::printf("  CPU        %s\n", features.brand.empty() ? "(unknown brand)" : features.brand.c_str());
  std::printf("  features   %s\n", features.ToString().c_str());
  std::printf("  path       %s (%s)\n", IsaName(plan.isa), IsaOrigin().c_str());
  std::printf("  threads    %d%s\n", flags.threads, flags.pin ? " (pinned)" : "");
  std::printf(
      "  shape      %s: E=%d experts, top-k=%d, hidden=%d, intermediate=%d; %s of %s expert "
      "weights per layer, %d layers\n",
      s.name.c_str(), s.experts, s.top_k, s.hidden, s.intermediate,
      FormatBytes(plan.expert_bytes * s.experts).c_str(), format, s.layers);
  if (!plan.method.empty()) std::printf("  method     %s\n", plan.method.c_str());
  std::fflush(stdout);
}

absl::StatusOr<Yardsticks> MeasureYardsticks(const BenchFlags& flags, const BenchPlan& plan) {
  Yardsticks y;
  std::printf("\nYardsticks (measured in this run, %d threads)\n", flags.threads);
  std::fflush(stdout);
  y.bandwidth =
      MeasureReadBandwidth(static_cast<size_t>(flags.bandwidth_mib) << 20, flags.threads, 10, flags.pin);
  if (y.bandwidth.bytes_per_second <= 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("could not allocate ", flags.bandwidth_mib, " MiB for the bandwidth measurement"));
  }
  std::printf("  read bandwidth  %7.1f GB/s    (streaming read of %zu MiB, %s, best of %d)\n",
              y.bandwidth.bytes_per_second / 1e9, y.bandwidth.buffer_bytes >> 20, y.bandwidth.method.c_str(),
              y.bandwidth.reps);
  std::fflush(stdout);
  // The yardstick of the format's kernels: bf16/fp32 instructions, or the int8 ones for quantized experts.
  // Formats whose products read int8 rows run integer instructions; bf16 and FP8 (decoded to fp32 / bf16
  // panels, bf16 rows) run float ones.
  y.int_kernels = FormatTraits(plan.format).activation != ActivationKind::kBf16Rows;
  y.peak = MeasurePeak(plan.isa, flags.threads, flags.pin, 0.2, 5,
                       y.int_kernels ? PeakOperands::kInt8 : PeakOperands::kFloat);
  y.peak_unit = y.int_kernels ? "TOPS" : "TFLOPS";
  std::printf(
      "  peak compute    %7.3f %-6s  (%s path: %s, %d %s each, %d independent chains per thread, "
      "best of %d)\n",
      y.peak.flops_per_second / 1e12, y.peak_unit, IsaName(plan.isa), y.peak.instruction.c_str(),
      y.peak.flop_per_instruction, y.int_kernels ? "ops" : "FLOP", y.peak.chains, y.peak.reps);
  std::fflush(stdout);
  return y;
}

// Several layers (copies of the same values in distinct memory) where one layer would not dwarf the
// last-level cache, so that the timed calls read their weights from DRAM as a real model does.
int LayerCopies(const BenchFlags& flags, const BenchPlan& plan, size_t llc) {
  if (flags.layers != 0) return flags.layers;
  const double layer_bytes = plan.expert_bytes * plan.shape.experts;
  const double want = 4.0 * static_cast<double>(llc) / layer_bytes;
  // At most half of the physical memory for the copies (the canonical weights are held meanwhile).
  const double ram = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  const int fit = static_cast<int>(0.5 * ram / layer_bytes) - 1;
  return std::max(1, std::min({plan.shape.layers, fit, static_cast<int>(std::ceil(want))}));
}

// One benchmark run: the layers it times and the phases it times them in.
class BenchRun {
 public:
  BenchRun(const BenchFlags& flags, BenchPlan plan, Yardsticks yard)
      : flags_(flags),
        plan_(std::move(plan)),
        yard_(std::move(yard)),
        pool_(ThreadPoolOptions{flags.threads, flags.pin}),
        rng_(flags.seed) {}

  absl::Status MakeLayers();
  bool CheckAccuracy();
  absl::Status Decode();
  absl::Status Prefill();
  absl::Status SweepTilings();
  void CompareWithTorch();

 private:
  absl::Status MakeSyntheticLayers(size_t llc);
  absl::Status MakeFolderLayers(size_t llc);
  std::vector<bf16_t> RandomInput(int qlen, uint64_t stream) const;
  std::vector<Routing> Patterns(std::mt19937_64& rng, int count, int qlen) const;
  // `iters` timed calls after `warmup` untimed ones, cycling through `patterns` and the layer copies.
  absl::Status TimeCalls(int qlen, int iters, int warmup, const std::vector<Routing>& patterns,
                         TimedRuns* out);
  void PrintAccuracyOfFormat(const std::vector<bf16_t>& x, const Routing& r, const std::vector<bf16_t>& y);

  const BenchFlags& flags_;
  BenchPlan plan_;
  Yardsticks yard_;
  ThreadPool pool_;
  std::mt19937_64 rng_;
  std::vector<std::unique_ptr<MoeLayer>> layers_;
  // The canonical bf16 weights the layers hold (gate, up [E, I, H], down [E, H, I]), kept for the accuracy
  // check; empty where the folder holds only quantized weights.
  std::vector<bf16_t> gate_, up_, down_;
  TimedRuns decode_, prefill_;
};

absl::Status BenchRun::MakeLayers() {
  const size_t llc = LastLevelCacheBytes();
  absl::Status s = flags_.weights.empty() ? MakeSyntheticLayers(llc) : MakeFolderLayers(llc);
  if (!s.ok()) return s;
  plan_.expert_bytes = static_cast<double>(layers_[0]->weight_bytes()) / plan_.shape.experts;
  const int copies = static_cast<int>(layers_.size());
  std::printf(
      "           %d layer cop%s in distinct memory, %s packed in all (last-level cache %s%s)\n", copies,
      copies == 1 ? "y" : "ies", FormatBytes(static_cast<double>(layers_[0]->weight_bytes()) * copies).c_str(),
      llc > 0 ? FormatBytes(static_cast<double>(llc)).c_str() : "unknown",
      flags_.layers == 0 ? "; copies chosen to exceed 4x the cache, --layers overrides" : "");
  return absl::OkStatus();
}

absl::Status BenchRun::MakeSyntheticLayers(size_t llc) {
  // Weights: uniform with standard deviation 1/sqrt(fan_in), deterministic in --seed.
  Clock::time_point t0 = Clock::now();
  const size_t h = plan_.shape.hidden, inter = plan_.shape.intermediate;
  const size_t n = static_cast<size_t>(plan_.shape.experts) * inter * h;
  gate_.resize(n);
  up_.resize(n);
  down_.resize(n);
  FillRandomBf16(pool_, flags_.seed * 16 + 1, n, 1.0f / std::sqrt(static_cast<float>(h)), gate_.data());
  FillRandomBf16(pool_, flags_.seed * 16 + 2, n, 1.0f / std::sqrt(static_cast<float>(h)), up_.data());
  FillRandomBf16(pool_, flags_.seed * 16 + 3, n, 1.0f / std::sqrt(static_cast<float>(inter)), down_.data());
  const double gen_s = Seconds(t0);
  const int copies = LayerCopies(flags_, plan_, llc);
  t0 = Clock::now();
  for (int l = 0; l < copies; ++l) {
    absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(plan_.config, plan_.isa, plan_.format);
    if (!moe.ok()) return absl::Status(moe.status().code(), absl::StrCat("MoeLayer::Create: ", moe.status().ToString()));
    if (absl::Status t = (*moe)->SetTiling(flags_.tiling); !t.ok()) {
      return absl::Status(t.code(), absl::StrCat("--tiling: ", t.ToString()));
    }
    absl::Status load = (*moe)->LoadWeights(gate_.data(), up_.data(), down_.data(), nullptr, pool_);
    if (!load.ok()) return absl::Status(load.code(), absl::StrCat("LoadWeights: ", load.ToString()));
    layers_.push_back(std::move(*moe));
  }
  std::printf("\nWeights    random bf16, std 1/sqrt(fan_in), seed %llu: generated in %.1f s, packed in %.1f s\n",
              static_cast<unsigned long long>(flags_.seed), gen_s, Seconds(t0));
  return absl::OkStatus();
}

// The canonical bf16 weights of MoE layer `layer` of `dir` (a Hugging Face or converted bf16 folder).
absl::Status ReadCanonicalWeights(const std::string& dir, int layer, std::vector<bf16_t>* gate,
                                  std::vector<bf16_t>* up, std::vector<bf16_t>* down) {
  LayerRequest want;
  want.layer = layer;
  absl::StatusOr<MethodLayout> bf16 = LayoutOfMethod("BF16");
  if (!bf16.ok()) return bf16.status();
  want.method = *bf16;
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(dir, want);
  if (!le.ok()) return le.status();
  const size_t e = (*le)->num_experts(), gate_size = (*le)->Rows(ExpertMatrix::kGate) * (*le)->Cols(ExpertMatrix::kGate);
  gate->resize(e * gate_size);
  up->resize(e * gate_size);
  down->resize(e * gate_size);  // [H, I]: as many elements as [I, H]
  for (size_t x = 0; x < e; ++x) {
    absl::Status s = (*le)->ReadBf16(x, ExpertMatrix::kGate, gate->data() + x * gate_size);
    if (s.ok()) s = (*le)->ReadBf16(x, ExpertMatrix::kUp, up->data() + x * gate_size);
    if (s.ok()) s = (*le)->ReadBf16(x, ExpertMatrix::kDown, down->data() + x * gate_size);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status BenchRun::MakeFolderLayers(size_t llc) {
  FolderLayerOptions options;
  options.method = plan_.method;
  options.group_size = plan_.config.group_size;
  options.isa = plan_.isa;
  options.max_len = plan_.config.max_len;
  options.layer = flags_.layer;
  const int copies = LayerCopies(flags_, plan_, llc);
  const Clock::time_point t0 = Clock::now();
  FolderLayer first;
  for (int l = 0; l < copies; ++l) {
    absl::StatusOr<FolderLayer> opened = OpenLayerFromFolder(flags_.weights, options, pool_);
    if (!opened.ok()) return opened.status();
    if (absl::Status t = opened->moe->SetTiling(flags_.tiling); !t.ok()) {
      return absl::Status(t.code(), absl::StrCat("--tiling: ", t.ToString()));
    }
    layers_.push_back(std::move(opened->moe));
    if (l == 0) first = *std::move(opened);
  }
  const double load_s = Seconds(t0);
  std::printf("\nWeights    %s layer %d (%s folder, method %s): %s of expert weights read, verified in %.2f s, "
              "loaded in %.1f s for %d cop%s\n",
              flags_.weights.c_str(), first.layer, first.stats.converted ? "kt converted" : "Hugging Face",
              plan_.method.c_str(), FormatBytes(static_cast<double>(first.stats.file_bytes)).c_str(),
              first.stats.verify_seconds, load_s, copies, copies == 1 ? "y" : "ies");
  plan_.config = layers_[0]->config();
  bool quantized_folder = first.stats.converted && plan_.format != ExpertFormat::kBf16;
  // A native int4 checkpoint (RAWINT4, GPTQ_INT4) read as stored holds no bf16 model either: its dequantized
  // weights are not bf16 values, so the reference could not quantize them back to the layer's.
  if (plan_.format == ExpertFormat::kInt4GroupSym) {
    const absl::StatusOr<int> g = HfInt4GroupSize(flags_.weights);
    quantized_folder = quantized_folder || (g.ok() && *g == plan_.config.group_size);
  }
  if (quantized_folder) return absl::OkStatus();
  return ReadCanonicalWeights(flags_.weights, first.layer, &gate_, &up_, &down_);
}

std::vector<bf16_t> BenchRun::RandomInput(int qlen, uint64_t stream) const {
  std::vector<bf16_t> x(static_cast<size_t>(qlen) * plan_.shape.hidden);
  for (size_t i = 0; i < x.size(); ++i) x[i] = F32ToBf16(std::sqrt(3.0f) * UniformSym(Mix(stream), i));
  return x;
}

std::vector<Routing> BenchRun::Patterns(std::mt19937_64& rng, int count, int qlen) const {
  // A small call avoids the experts of the calls on its layer copy that read twice the last-level cache
  // before it, so that it reads its experts from memory (they were in cache: decode "beat" the bandwidth).
  const int copies = static_cast<int>(std::max<size_t>(1, layers_.size()));
  const double call_bytes = static_cast<double>(qlen) * plan_.shape.top_k * plan_.expert_bytes;
  const int window = call_bytes > 0 ? static_cast<int>(std::ceil(2.0 * LastLevelCacheBytes() / (call_bytes * copies)))
                                    : 0;
  return CacheAvoidingRoutings(rng, count, qlen, plan_.shape.top_k, plan_.shape.experts, copies, window);
}

// Accuracy against the double-accumulation reference.
bool BenchRun::CheckAccuracy() {
  if (gate_.empty()) {
    std::printf("Accuracy   skipped: the folder holds quantized weights only, no bf16 model to compare with\n");
    return true;
  }
  const int k = plan_.shape.top_k;
  const Routing r = RandomRouting(rng_, kAccuracyQlen, k, plan_.shape.experts);
  const std::vector<bf16_t> x = RandomInput(kAccuracyQlen, flags_.seed * 16 + 4);
  std::vector<bf16_t> y(static_cast<size_t>(kAccuracyQlen) * plan_.shape.hidden);
  absl::Status st =
      layers_[0]->Forward(pool_, kAccuracyQlen, k, r.ids.data(), r.weights.data(), x.data(), y.data(), nullptr);
  if (!st.ok()) {
    std::fprintf(stderr, "kt bench: Forward: %s\n", st.ToString().c_str());
    return false;
  }
  std::vector<float> ref(y.size());
  MoeForwardReference(plan_.config, kAccuracyQlen, k, r.ids.data(), r.weights.data(), x.data(), gate_.data(),
                      up_.data(), down_.data(), nullptr, ref.data(), plan_.format);
  double max_err = 0, max_ref = 0;
  bool finite = true;
  for (size_t i = 0; i < y.size(); ++i) {
    const double v = Bf16ToF32(y[i]);
    if (!std::isfinite(v)) finite = false;
    max_err = std::max(max_err, std::fabs(v - ref[i]));
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[i])));
  }
  const double rel = max_ref > 0 ? max_err / max_ref : (max_err > 0 ? INFINITY : 0.0);
  const bool pass = finite && max_ref > 0 && rel < kAccuracyTolerance;
  std::printf(
      "Accuracy   qlen %d vs MoeForwardReference (double accumulation): max|err|/max|ref| = "
      "%.2e (max|ref| %.3g)  %s (< %.0e)\n",
      kAccuracyQlen, rel, max_ref, pass ? "PASS" : "FAIL", kAccuracyTolerance);
  if (plan_.format != ExpertFormat::kBf16) PrintAccuracyOfFormat(x, r, y);
  // The canonical weights are not needed any more: give their memory back before the timed calls.
  gate_ = {};
  up_ = {};
  down_ = {};
  std::fflush(stdout);
  return pass;
}

// The format's own error: against the bf16 model, as the original's accuracy tests measure it.
void BenchRun::PrintAccuracyOfFormat(const std::vector<bf16_t>& x, const Routing& r,
                                     const std::vector<bf16_t>& y) {
  std::vector<float> bf16_ref(y.size());
  MoeForwardReference(plan_.config, kAccuracyQlen, plan_.shape.top_k, r.ids.data(), r.weights.data(), x.data(),
                      gate_.data(), up_.data(), down_.data(), nullptr, bf16_ref.data(), ExpertFormat::kBf16);
  double sum_err = 0, sum_ref = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    sum_err += std::fabs(Bf16ToF32(y[i]) - bf16_ref[i]);
    sum_ref += std::fabs(static_cast<double>(bf16_ref[i]));
  }
  std::printf("           %s format vs the bf16 model: mean|err|/mean|ref| = %.4f\n",
              ExpertFormatName(plan_.format), sum_ref > 0 ? sum_err / sum_ref : 0.0);
}

absl::Status BenchRun::TimeCalls(int qlen, int iters, int warmup, const std::vector<Routing>& patterns,
                                 TimedRuns* out) {
  const std::vector<bf16_t> x = RandomInput(qlen, flags_.seed * 16 + 5 + qlen);
  std::vector<bf16_t> y(static_cast<size_t>(qlen) * plan_.shape.hidden);
  for (int it = -warmup; it < iters; ++it) {
    const Routing& r = patterns[(it + warmup) % patterns.size()];
    MoeLayer& layer = *layers_[(it + warmup) % layers_.size()];
    const Clock::time_point start = Clock::now();
    absl::Status s =
        layer.Forward(pool_, qlen, plan_.shape.top_k, r.ids.data(), r.weights.data(), x.data(), y.data(), nullptr);
    const double sec = Seconds(start);
    if (!s.ok()) return s;
    if (it >= 0) {
      out->seconds.push_back(sec);
      out->bytes.push_back(r.distinct_experts * plan_.expert_bytes);
      AddProfile(layer.last_profile(), &out->phases);
    }
  }
  return absl::OkStatus();
}

// Decode: many routing patterns so that consecutive calls touch different experts, and layer copies
// (>> last-level cache) so that the cache cannot serve them.
absl::Status BenchRun::Decode() {
  // One pattern per call (warm-up included), so that the cache-avoiding sequence never wraps around.
  const int warmup = std::max<int>(3, layers_.size());
  const int num_patterns = std::max(flags_.iters, 1) + warmup;
  const std::vector<Routing> patterns = Patterns(rng_, num_patterns, flags_.qlen_decode);
  absl::Status st = TimeCalls(flags_.qlen_decode, flags_.iters, warmup, patterns, &decode_);
  if (!st.ok()) return absl::Status(st.code(), absl::StrCat("Forward (decode): ", st.ToString()));
  std::vector<double> gbps(decode_.seconds.size());
  for (size_t i = 0; i < gbps.size(); ++i) gbps[i] = decode_.bytes[i] / decode_.seconds[i] / 1e9;
  const double med = Percentile(decode_.seconds, 0.5);
  const double med_gbps = Percentile(gbps, 0.5);
  // The read bandwidth of a VM can move by +-20% between minutes, so the yardstick is measured again
  // right after the decode loop and the larger of the two readings is the one the decode rate is
  // compared with.
  const BandwidthResult bw_after =
      MeasureReadBandwidth(static_cast<size_t>(flags_.bandwidth_mib) << 20, flags_.threads, 10, flags_.pin);
  const double bw_before = yard_.bandwidth.bytes_per_second;
  const double bw_gbps = std::max(bw_before, bw_after.bytes_per_second) / 1e9;
  const int copies = static_cast<int>(layers_.size());
  const int model_layers = plan_.shape.layers;
  std::printf("\nDecode     qlen %d, %d iterations over %d routing patterns and %d layer cop%s\n",
              flags_.qlen_decode, flags_.iters, num_patterns, copies, copies == 1 ? "y" : "ies");
  std::printf("  latency     median %s per layer  (p10 %s, p90 %s)\n", FormatTime(med).c_str(),
              FormatTime(Percentile(decode_.seconds, 0.1)).c_str(),
              FormatTime(Percentile(decode_.seconds, 0.9)).c_str());
  std::printf(
      "  tokens/s    %.1f for one layer; %.2f for a %d-layer model (extrapolation: routed experts "
      "only, x%d layers)\n",
      flags_.qlen_decode / med, flags_.qlen_decode / (med * model_layers), model_layers, model_layers);
  std::printf(
      "  weights     %s of distinct experts touched per call (median) -> %.1f GB/s = %.0f%% of the "
      "measured read bandwidth %.1f GB/s (the larger of %.1f before and %.1f right after the decode loop)\n",
      FormatBytes(Percentile(decode_.bytes, 0.5)).c_str(), med_gbps, 100.0 * med_gbps / bw_gbps, bw_gbps,
      bw_before / 1e9, bw_after.bytes_per_second / 1e9);
  PrintPhases(decode_);
  std::fflush(stdout);
  return absl::OkStatus();
}

absl::Status BenchRun::Prefill() {
  const std::vector<Routing> patterns =
      Patterns(rng_, std::min(flags_.prefill_iters + 1, 8), flags_.qlen_prefill);
  // One untimed call per layer copy: a layer's first prefill page-faults its scratch in, which would make
  // the first timed call of each copy several times slower than the others.
  absl::Status st = TimeCalls(flags_.qlen_prefill, flags_.prefill_iters, static_cast<int>(layers_.size()),
                              patterns, &prefill_);
  if (!st.ok()) return absl::Status(st.code(), absl::StrCat("Forward (prefill): ", st.ToString()));
  const double med = Percentile(prefill_.seconds, 0.5);
  const double flop = plan_.flop_per_routed_row * plan_.shape.top_k * flags_.qlen_prefill;
  const double tflops = flop / med / 1e12;
  const double peak_tflops = yard_.peak.flops_per_second / 1e12;
  const double med_bytes = Percentile(prefill_.bytes, 0.5);
  std::printf("\nPrefill    qlen %d, %d iterations\n", flags_.qlen_prefill, flags_.prefill_iters);
  std::printf("  latency     median %s per layer  (min %s, max %s); %.0f tokens/s for one layer\n",
              FormatTime(med).c_str(), FormatTime(Percentile(prefill_.seconds, 0.0)).c_str(),
              FormatTime(Percentile(prefill_.seconds, 1.0)).c_str(), flags_.qlen_prefill / med);
  PrintPhases(prefill_);
  std::printf("  calls      ");
  for (double sec : prefill_.seconds) std::printf(" %s", FormatTime(sec).c_str());
  std::printf("\n");
  std::printf("  compute     %.3f %s = %.0f%% of the measured %s peak %.3f %s (%s)%s\n", tflops, yard_.peak_unit,
              100.0 * tflops / peak_tflops, IsaName(plan_.isa), peak_tflops, yard_.peak_unit,
              yard_.peak.instruction.c_str(), yard_.int_kernels ? "; integer multiply-adds count 2 ops" : "");
  std::printf(
      "  weights     %.0f distinct experts, %s touched per call -> %.1f GB/s (read bandwidth "
      "%.1f GB/s)\n",
      med_bytes / plan_.expert_bytes, FormatBytes(med_bytes).c_str(), med_bytes / med / 1e9,
      yard_.bandwidth.bytes_per_second / 1e9);
  std::fflush(stdout);
  return absl::OkStatus();
}

// The same prefill (layers, routings, input) under each tiling, one warm-up call per layer.
absl::Status BenchRun::SweepTilings() {
  for (const MoeTiling& t : flags_.sweep) {
    for (auto& layer : layers_) {
      if (absl::Status ts = layer->SetTiling(t); !ts.ok()) {
        return absl::Status(ts.code(), absl::StrCat("--sweep-tiling: ", ts.ToString()));
      }
    }
    std::mt19937_64 sweep_rng(flags_.seed + 7);
    const std::vector<Routing> patterns =
        Patterns(sweep_rng, std::min(flags_.prefill_iters + 1, 8), flags_.qlen_prefill);
    TimedRuns sw;
    absl::Status st = TimeCalls(flags_.qlen_prefill, flags_.prefill_iters, static_cast<int>(layers_.size()),
                                patterns, &sw);
    if (!st.ok()) return absl::Status(st.code(), absl::StrCat("Forward (sweep): ", st.ToString()));
    const double med = Percentile(sw.seconds, 0.5);
    const double n = static_cast<double>(sw.seconds.size());
    std::printf("Sweep      tiling %d,%d,%d,%d: prefill qlen %d median %s (min %s), %.3f %s; gate/up %s, "
                "down+weighted sum %s\n",
                t.gate_up_panels, t.down_panels, t.row_chunk, t.k_block, flags_.qlen_prefill,
                FormatTime(med).c_str(), FormatTime(Percentile(sw.seconds, 0.0)).c_str(),
                plan_.flop_per_routed_row * plan_.shape.top_k * flags_.qlen_prefill / med / 1e12,
                yard_.peak_unit, FormatTime(sw.phases.gate_up / n).c_str(),
                FormatTime(sw.phases.down / n).c_str());
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

void BenchRun::CompareWithTorch() {
  TorchRequest request;
  request.enabled = flags_.torch;
  request.python = flags_.python;
  request.torch_script = flags_.torch_script;
  request.threads = flags_.threads;
  request.experts = plan_.shape.experts;
  request.top_k = plan_.shape.top_k;
  request.hidden = plan_.shape.hidden;
  request.intermediate = plan_.shape.intermediate;
  request.qlen_decode = flags_.qlen_decode;
  request.qlen_prefill = flags_.qlen_prefill;
  request.seed = flags_.seed;
  const TorchResult torch = RunTorch(request);
  if (!torch.ok) return;
  const double kt_dec = Percentile(decode_.seconds, 0.5);
  const double kt_pre = Percentile(prefill_.seconds, 0.5);
  if (!std::isnan(torch.decode_seconds)) {
    std::printf("  decode   qlen %-4d kt %s vs torch %s per layer -> kt/torch speed %.2fx\n", flags_.qlen_decode,
                FormatTime(kt_dec).c_str(), FormatTime(torch.decode_seconds).c_str(),
                torch.decode_seconds / kt_dec);
  }
  if (!std::isnan(torch.prefill_seconds)) {
    const double flop = plan_.flop_per_routed_row * plan_.shape.top_k * flags_.qlen_prefill;
    std::printf(
        "  prefill  qlen %-4d kt %s (%.3f TFLOPS) vs torch %s (%.3f TFLOPS) per layer -> kt/torch speed "
        "%.2fx\n",
        flags_.qlen_prefill, FormatTime(kt_pre).c_str(), flop / kt_pre / 1e12,
        FormatTime(torch.prefill_seconds).c_str(), flop / torch.prefill_seconds / 1e12,
        torch.prefill_seconds / kt_pre);
  }
  PrintDenseComparison(torch, kt_pre);  // and flushes stdout
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "kt bench: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int RunBench(BenchFlags flags) {
  if (flags.threads == 0) flags.threads = HardwareThreads();
  cpu_set_t initial_affinity;
  CPU_ZERO(&initial_affinity);
  sched_getaffinity(0, sizeof(initial_affinity), &initial_affinity);
  const absl::StatusOr<Isa> isa = SelectIsa();
  if (!isa.ok()) {
    std::fprintf(stderr, "kt bench: %s\n", std::string(isa.status().message()).c_str());
    return kExitUsage;
  }
  absl::StatusOr<BenchPlan> plan = flags.weights.empty() ? PlanSynthetic(flags, *isa) : PlanFromFolder(flags, *isa);
  if (!plan.ok()) return Fail(plan.status());
  FinishPlan(flags, &*plan);
  PrintHeader(flags, *plan);
  // Yardsticks first, while the weights are not yet allocated.
  absl::StatusOr<Yardsticks> yard = MeasureYardsticks(flags, *plan);
  if (!yard.ok()) return Fail(yard.status());

  BenchRun run(flags, *std::move(plan), *std::move(yard));
  if (absl::Status s = run.MakeLayers(); !s.ok()) return Fail(s);
  const bool accuracy_pass = run.CheckAccuracy();
  if (absl::Status s = run.Decode(); !s.ok()) return Fail(s);
  if (absl::Status s = run.Prefill(); !s.ok()) return Fail(s);
  if (absl::Status s = run.SweepTilings(); !s.ok()) return Fail(s);
  // ThreadPoolOptions::pin pins the calling thread too, and a child process inherits that thread's
  // affinity: give PyTorch back every CPU this process started with.
  sched_setaffinity(0, sizeof(initial_affinity), &initial_affinity);
  run.CompareWithTorch();
  if (!accuracy_pass) {
    std::fprintf(stderr, "kt bench: accuracy check FAILED\n");
    return 1;
  }
  return 0;
}

}  // namespace tools
}  // namespace kt
