// kt: the command line tool.
//
//   kt bench [flags]   Benchmarks the BF16 routed experts of one MoE layer (decode and prefill) and prints
//                      every rate beside a yardstick measured in the same run: GB/s beside the machine's
//                      read bandwidth, TFLOPS beside the kernel path's peak, speed beside PyTorch.
//   kt doctor          CPU, features, kernel paths, what KT_ISA resolves to.
//   kt convert         Converts a Hugging Face bf16 checkpoint into kt's converted folder for one method
//                      (kt/io/convert.h): streaming, resumable, atomic, with a checksummed manifest.
//   kt --version       The version and the kernel path this process selects.
//
// Every flag is an ABSL_FLAG below; each command lists the flags it accepts (kBenchFlags, kConvertFlags) and
// tools/cli_flags.h parses them and generates their usage text. Exit codes: 0 success (and --help), 1 a
// failed run, 2 a usage error (unknown command or flag, bad value: the message names it).
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/io/convert.h"
#include "kt/io/file_util.h"
#include "kt/io/method.h"
#include "kt/moe/moe_layer.h"
#include "kt/moe/moe_reference.h"
#include "kt/moe/synthetic.h"
#include "kt/moe/thread_pool.h"
#include "tools/bandwidth.h"
#include "tools/cli_flags.h"
#include "tools/parallel.h"
#include "tools/peak.h"

namespace kt {
namespace tools {

struct Shape {
  const char* name;
  int experts, top_k, hidden, intermediate, layers;
};

constexpr Shape kShapes[] = {
    {"qwen3-30b-a3b", 128, 8, 2048, 768, 48},
    {"qwen3-235b-a22b", 128, 8, 4096, 1536, 94},
};

// Flag value types (Abseil finds AbslParseFlag / AbslUnparseFlag next to the type).

struct ShapeFlag {
  const Shape* shape = &kShapes[0];
};

bool AbslParseFlag(absl::string_view text, ShapeFlag* out, std::string* error) {
  for (const Shape& shape : kShapes) {
    if (text == shape.name) {
      out->shape = &shape;
      return true;
    }
  }
  *error = "expected qwen3-30b-a3b or qwen3-235b-a22b";
  return false;
}

std::string AbslUnparseFlag(const ShapeFlag& f) { return f.shape->name; }

struct FormatFlag {
  ExpertFormat format = ExpertFormat::kBf16;
};

bool AbslParseFlag(absl::string_view text, FormatFlag* out, std::string* error) {
  const absl::StatusOr<ExpertFormat> parsed = ParseExpertFormat(text);
  if (!parsed.ok()) {
    *error = std::string(parsed.status().message());
    return false;
  }
  out->format = *parsed;
  return true;
}

std::string AbslUnparseFlag(const FormatFlag& f) { return ExpertFormatName(f.format); }

// Tilings G,D[,R[,KB]] separated by spaces. The ranges are the layer's to check (MoeLayer::SetTiling names
// the field); `--tiling` takes exactly one, `--sweep-tiling` any number.
struct TilingsFlag {
  std::vector<MoeTiling> tilings;
};

bool AbslParseFlag(absl::string_view text, TilingsFlag* out, std::string* error) {
  std::vector<MoeTiling> tilings;
  for (absl::string_view one : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    const std::vector<absl::string_view> parts = absl::StrSplit(one, ',');
    MoeTiling tiling;
    int* fields[] = {&tiling.gate_up_panels, &tiling.down_panels, &tiling.row_chunk, &tiling.k_block};
    bool ok = parts.size() >= 2 && parts.size() <= 4;
    for (size_t i = 0; ok && i < parts.size(); ++i) ok = absl::SimpleAtoi(parts[i], fields[i]);
    if (!ok) {
      *error = absl::StrCat("'", one,
                            "': expected G,D[,R[,KB]] (panels of 16 columns per gate/up and down task, rows per "
                            "gate/up kernel call, AMX K block), integers");
      return false;
    }
    tilings.push_back(tiling);
  }
  out->tilings = std::move(tilings);
  return true;
}

std::string AbslUnparseFlag(const TilingsFlag& f) {
  return absl::StrJoin(f.tilings, " ", [](std::string* out, const MoeTiling& t) {
    absl::StrAppend(out, t.gate_up_panels, ",", t.down_panels, ",", t.row_chunk, ",", t.k_block);
  });
}

}  // namespace tools
}  // namespace kt

// Flags of `kt bench`.
ABSL_FLAG(kt::tools::ShapeFlag, shape, {},
          "qwen3-30b-a3b (E=128, k=8, H=2048, I=768) or qwen3-235b-a22b (E=128, k=8, H=4096, I=1536; 4.8 GB of "
          "weights)");
ABSL_FLAG(bool, pin, false, "pin thread i to the i-th allowed CPU (kt and yardsticks)");
ABSL_FLAG(int, qlen_decode, 1, "tokens per decode call");
ABSL_FLAG(int, qlen_prefill, 512, "tokens per prefill call");
ABSL_FLAG(int, iters, 100, "decode iterations, median reported (at least 50 recommended)");
ABSL_FLAG(int, prefill_iters, 5, "prefill iterations");
ABSL_FLAG(int, layers, 0,
          "copies of the layer (same values, distinct memory) that the timed calls cycle through (0: enough to "
          "exceed 4x the last-level cache, at least 1)");
ABSL_FLAG(int, bandwidth_mib, 1024, "size of the read-bandwidth buffer in MiB");
ABSL_FLAG(int, seed, 1, "seed of the random weights, inputs and routing");
ABSL_FLAG(kt::tools::FormatFlag, format, {},
          "expert weights: bf16, int8, int4 or int4_asym (quantized per output channel at load, activations per "
          "token), int4_group_sym or int4_group_asym (a scale, and for asym a zero point, per --group-size k; "
          "activations per token and group), fp8_block (FP8 E4M3 with 128x128 block scales, bf16 "
          "activations); the accuracy line then also reports the format's own error "
          "against the bf16 model");
ABSL_FLAG(kt::tools::TilingsFlag, tiling, {{kt::MoeTiling{}}},
          "G,D[,R[,KB]]: panels of 16 columns per task in the gate/up and down phases (1..16 each; 0 keeps the "
          "layer's choice: 3, on amx 2-8 sized to L2 and 8), rows per gate/up kernel call R (16..1024; 0: 64) "
          "and the AMX kernels' K block KB (0: none); for tuning only, results are bit-identical");
ABSL_FLAG(kt::tools::TilingsFlag, sweep_tiling, {},
          "\"T ...\": after the prefill, time it again under each tiling T (G,D[,R[,KB]], separated by spaces) "
          "on the same layers and routings: one line per tiling");
ABSL_FLAG(bool, no_torch, false, "skip the PyTorch yardstick");
ABSL_FLAG(std::string, python, "/usr/bin/python3", "interpreter for the PyTorch yardstick");
ABSL_FLAG(std::string, torch_script, "",
          "tools/torch_moe_bench.py (empty: $KT_TORCH_BENCH, else found in the runfiles)");

// Flags of `kt convert`.
ABSL_FLAG(std::string, input, "",
          "required: Hugging Face folder: config.json + model.safetensors (or a sharded index), bf16 experts "
          "(or FP8 with 128x128 block scales, for --method FP8)");
ABSL_FLAG(std::string, output, "",
          "required: created if missing; rerunning into it resumes (layers whose checksums verify are kept)");
ABSL_FLAG(std::string, method, "",
          "required: BF16 | AMXINT8 | MOE_INT8 | AMXINT4 | MOE_INT4 | RAWINT4 | GPTQ_INT4 | AMXINT4_KGroup | "
          "AMXINT4_1KGroup | FP8 (an FP8 folder is copied as stored) (docs/FORMATS.md: method -> layout)");

// Flags of both.
ABSL_FLAG(int, threads, 0,
          "threads (bench: kt, the yardsticks and PyTorch; convert: quantization); 0: the CPUs in this "
          "process's affinity mask");
ABSL_FLAG(int, group_size, 128,
          "group of the k-group int4 formats (bench: --format int4_group_*, 32, 64 or 128; convert: "
          "AMXINT4_KGroup / AMXINT4_1KGroup)");

namespace kt {
namespace tools {
namespace {

using Clock = std::chrono::steady_clock;

// The version of kt (the Python package's kt/python/kt_kernel/_version.py says the same; kt_cli_test
// checks it).
constexpr const char* kVersion = "0.1.0";
constexpr int kExitUsage = 2;
constexpr const char* kTorchScript = "tools/torch_moe_bench.py";
constexpr int kAccuracyQlen = 7;
constexpr double kAccuracyTolerance = 1e-2;

double Seconds(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ---------------------------------------------------------------------------------------------------------
// Usage.

constexpr const char* kUsage =
    R"(usage: kt <command> [flags]
       kt --version    the version and the kernel path this process selects
       kt --help

commands:
  bench    benchmark the BF16 routed experts of one MoE layer (decode + prefill), with yardsticks measured
           in the same run: read bandwidth, the kernel path's peak compute, and PyTorch
  doctor   print the CPU, its features, every kernel path (supported or not) and what KT_ISA selects
  convert  convert a Hugging Face bf16 checkpoint's routed experts for one method

environment:
  KT_ISA   cap the kernel path: scalar | avx2 | avx512 | avx512_vnni | avx512_bf16 | amx
           (unset: the best path this CPU supports; a path it cannot run is an error, exit 2)

`kt <command> --help` lists the command's flags. Under Bazel: bazel run -c opt //tools:kt -- bench
)";

// The flags each command accepts, with the range an int given on the command line must fall in.
constexpr FlagSpec kBenchFlags[] = {
    {"shape"},
    {"threads", 1, 4096},
    {"pin"},
    {"qlen_decode", 1, 1 << 16},
    {"qlen_prefill", 1, 1 << 16},
    {"iters", 1, 1 << 24},
    {"prefill_iters", 1, 1 << 20},
    {"layers", 1, 1024},
    {"bandwidth_mib", 16, 1 << 20},
    {"seed", 0, 1 << 30},
    {"format"},
    {"group_size", 32, 128},
    {"tiling"},
    {"sweep_tiling"},
    {"no_torch"},
    {"python"},
    {"torch_script"},
};

constexpr FlagSpec kConvertFlags[] = {
    {"input"},
    {"output"},
    {"method"},
    // The method's own check (kt/io/convert.h) decides which group sizes a k-group method takes.
    {"group_size", 1, std::numeric_limits<int>::max()},
    {"threads", 1, std::numeric_limits<int>::max()},
};

std::string CommandUsage(const char* synopsis, absl::Span<const FlagSpec> flags, const char* epilogue = "") {
  return absl::StrCat("usage: ", synopsis, "\n\n", FlagsUsage(flags), epilogue);
}

int UsageError(const std::string& message, const std::string& usage) {
  std::fprintf(stderr, "kt: %s\n\n%s", message.c_str(), usage.c_str());
  return kExitUsage;
}

// Parses a command's flags. Returns -1 to go on, else the exit code: 0 after printing the usage for --help,
// kExitUsage after a usage error (the message prefixed with the command).
int ParseOrExit(const char* command, const std::vector<std::string>& args, absl::Span<const FlagSpec> flags,
                const std::string& usage, ParsedCommand* parsed) {
  absl::StatusOr<ParsedCommand> p = ParseCommandFlags(args, flags);
  if (!p.ok()) return UsageError(absl::StrCat(command, ": ", p.status().message()), usage);
  if (p->help) {
    std::printf("%s", usage.c_str());
    return 0;
  }
  *parsed = *std::move(p);
  return -1;
}

// ---------------------------------------------------------------------------------------------------------
// ISA selection.

absl::StatusOr<Isa> SelectIsa() {
  const char* env = std::getenv("KT_ISA");
  return ResolveIsa(env == nullptr ? "" : env, GetCpuFeatures());
}

std::string IsaOrigin() {
  const char* env = std::getenv("KT_ISA");
  if (env == nullptr || env[0] == '\0') return "best supported; KT_ISA unset";
  return absl::StrCat("KT_ISA=", env);
}

// ---------------------------------------------------------------------------------------------------------
// kt --version

int Version() {
  std::printf("kt %s\n", kVersion);
  const absl::StatusOr<Isa> isa = SelectIsa();
  if (!isa.ok()) {
    std::printf("kernel path: none (%s)\n", std::string(isa.status().message()).c_str());
    return kExitUsage;
  }
  std::printf("kernel path: %s (%s)\n", IsaName(*isa), IsaOrigin().c_str());
  return 0;
}

// ---------------------------------------------------------------------------------------------------------
// kt doctor

int Doctor(const std::vector<std::string>& args) {
  ParsedCommand parsed;
  const std::string usage = CommandUsage("kt doctor (no flags)", {});
  if (const int code = ParseOrExit("doctor", args, {}, usage, &parsed); code >= 0) return code;
  const CpuFeatures& f = GetCpuFeatures();
  std::printf("CPU       %s\n", f.brand.empty() ? "(unknown brand)" : f.brand.c_str());
  std::printf("features  %s\n", f.ToString().c_str());
  std::printf("threads   %d (CPUs in this process's affinity mask; std::thread::hardware_concurrency %u)\n",
              HardwareThreads(), std::thread::hardware_concurrency());
  std::printf("kernel paths (increasing preference):\n");
  const Isa best = BestIsa(f);
  for (int i = 0; i <= static_cast<int>(Isa::kAmx); ++i) {
    const Isa isa = static_cast<Isa>(i);
    const bool ok = IsaSupported(isa, f);
    std::string note;
    if (isa == best) note = "  <- best";
    if (!ok) {
      const absl::StatusOr<Isa> why = ResolveIsa(IsaName(isa), f);
      if (!why.ok()) note = absl::StrCat("  (", why.status().message(), ")");
    }
    std::printf("  %-12s %-3s%s\n", IsaName(isa), ok ? "yes" : "no", note.c_str());
  }
  const char* env = std::getenv("KT_ISA");
  const absl::StatusOr<Isa> isa = SelectIsa();
  if (!isa.ok()) {
    std::printf("KT_ISA    '%s' -> error: %s\n", env == nullptr ? "" : env,
                std::string(isa.status().message()).c_str());
    return kExitUsage;
  }
  std::printf("KT_ISA    %s -> %s\n", env == nullptr ? "(unset)" : absl::StrCat("'", env, "'").c_str(),
              IsaName(*isa));
  return 0;
}

// ---------------------------------------------------------------------------------------------------------
// kt bench: flags.

struct BenchFlags {
  Shape shape = kShapes[0];
  int threads = 0;
  bool pin = false;
  int qlen_decode = 1;
  int qlen_prefill = 512;
  int iters = 100;
  int prefill_iters = 5;
  int bandwidth_mib = 1024;
  int layers = 0;  // 0: enough copies of the layer to exceed 4x the last-level cache.
  uint64_t seed = 1;
  bool torch = true;
  ExpertFormat format = ExpertFormat::kBf16;
  MoeTiling tiling;  // 0, 0: the layer's own choice
  std::vector<MoeTiling> sweep;  // --sweep-tiling: prefill re-timed under each
  int group_size = 128;
  std::string python;
  std::string torch_script;
};

// The bench flags' values after parsing; an error message for a value their types and ranges admit that
// bench does not.
absl::StatusOr<BenchFlags> GetBenchFlags(const ParsedCommand& parsed) {
  BenchFlags flags;
  flags.shape = *absl::GetFlag(FLAGS_shape).shape;
  flags.threads = absl::GetFlag(FLAGS_threads);
  flags.pin = absl::GetFlag(FLAGS_pin);
  flags.qlen_decode = absl::GetFlag(FLAGS_qlen_decode);
  flags.qlen_prefill = absl::GetFlag(FLAGS_qlen_prefill);
  flags.iters = absl::GetFlag(FLAGS_iters);
  flags.prefill_iters = absl::GetFlag(FLAGS_prefill_iters);
  flags.bandwidth_mib = absl::GetFlag(FLAGS_bandwidth_mib);
  flags.layers = absl::GetFlag(FLAGS_layers);
  flags.seed = static_cast<uint64_t>(absl::GetFlag(FLAGS_seed));
  flags.torch = !absl::GetFlag(FLAGS_no_torch);
  flags.format = absl::GetFlag(FLAGS_format).format;
  flags.group_size = absl::GetFlag(FLAGS_group_size);
  flags.python = absl::GetFlag(FLAGS_python);
  flags.torch_script = absl::GetFlag(FLAGS_torch_script);
  const std::vector<MoeTiling> tiling = absl::GetFlag(FLAGS_tiling).tilings;
  flags.sweep = absl::GetFlag(FLAGS_sweep_tiling).tilings;
  if (tiling.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("flag --tiling '", AbslUnparseFlag(TilingsFlag{tiling}),
                                                   "': expected one G,D[,R[,KB]]"));
  }
  flags.tiling = tiling[0];
  const bool sweep_given =
      std::find(parsed.set.begin(), parsed.set.end(), "sweep_tiling") != parsed.set.end();
  if (sweep_given && flags.sweep.empty()) {
    return absl::InvalidArgumentError("flag --sweep-tiling: expected at least one G,D[,R[,KB]]");
  }
  if (flags.group_size != 32 && flags.group_size != 64 && flags.group_size != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --group-size ", flags.group_size, ": expected 32, 64 or 128"));
  }
  return flags;
}

// ---------------------------------------------------------------------------------------------------------
// Deterministic random data.


// ---------------------------------------------------------------------------------------------------------
// Statistics and formatting.

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const double pos = p * (v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(v.size() - 1, lo + 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

std::string FormatTime(double s) {
  if (s < 1e-3) return absl::StrFormat("%.1f us", s * 1e6);
  if (s < 1.0) return absl::StrFormat("%.2f ms", s * 1e3);
  return absl::StrFormat("%.3f s", s);
}

std::string FormatBytes(double b) {
  if (b >= 1e9) return absl::StrFormat("%.2f GB", b / 1e9);
  return absl::StrFormat("%.1f MB", b / 1e6);
}

// The size of the largest cache level cpu0 reports in sysfs (sysconf's value can be the host's in a VM), else
// sysconf's; 0 if unknown.
size_t LastLevelCacheBytes() {
  int best_level = 0;
  size_t best = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = absl::StrCat("/sys/devices/system/cpu/cpu0/cache/index", index, "/");
    FILE* level_file = std::fopen((dir + "level").c_str(), "r");
    if (level_file == nullptr) break;
    int level = 0;
    const bool have_level = std::fscanf(level_file, "%d", &level) == 1;
    std::fclose(level_file);
    FILE* size_file = std::fopen((dir + "size").c_str(), "r");
    if (size_file == nullptr) continue;
    unsigned long long size = 0;
    char unit = 0;
    const int n = std::fscanf(size_file, "%llu%c", &size, &unit);
    std::fclose(size_file);
    if (!have_level || n < 1) continue;
    if (n == 2 && (unit == 'K' || unit == 'k')) size <<= 10;
    if (n == 2 && (unit == 'M' || unit == 'm')) size <<= 20;
    if (level > best_level || (level == best_level && size > best)) {
      best_level = level;
      best = size;
    }
  }
  if (best > 0) return best;
  const long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return v > 0 ? static_cast<size_t>(v) : 0;
}

// ---------------------------------------------------------------------------------------------------------
// The PyTorch yardstick.

bool FileExists(const std::string& path) { return !path.empty() && access(path.c_str(), R_OK) == 0; }

std::string SelfExe() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  buf[n] = '\0';
  return buf;
}

// --torch-script, then $KT_TORCH_BENCH, then the runfiles (bazel run's cwd is <binary>.runfiles/kt), then
// the workspace of `bazel run`. Empty if none exists.
std::string FindTorchScript(const BenchFlags& flags, std::vector<std::string>* tried) {
  std::vector<std::string> candidates;
  if (!flags.torch_script.empty()) {
    candidates.push_back(flags.torch_script);
  } else {
    if (const char* env = std::getenv("KT_TORCH_BENCH")) candidates.push_back(env);
    candidates.push_back(kTorchScript);
    if (const char* dir = std::getenv("RUNFILES_DIR")) {
      candidates.push_back(absl::StrCat(dir, "/kt/", kTorchScript));
    }
    const std::string exe = SelfExe();
    if (!exe.empty()) candidates.push_back(absl::StrCat(exe, ".runfiles/kt/", kTorchScript));
    if (const char* ws = std::getenv("BUILD_WORKSPACE_DIRECTORY")) {
      candidates.push_back(absl::StrCat(ws, "/", kTorchScript));
    }
  }
  for (const std::string& c : candidates) {
    tried->push_back(c);
    if (FileExists(c)) return c;
  }
  return "";
}

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

// Extracts the number after "key": in a flat JSON line; NaN if absent.
double JsonNumber(const std::string& line, const std::string& key) {
  const std::string needle = absl::StrCat("\"", key, "\"");
  size_t pos = line.find(needle);
  if (pos == std::string::npos) return std::nan("");
  pos = line.find(':', pos + needle.size());
  if (pos == std::string::npos) return std::nan("");
  return std::strtod(line.c_str() + pos + 1, nullptr);
}

struct TorchResult {
  bool ok = false;
  double decode_seconds = std::nan("");
  double prefill_seconds = std::nan("");
  double prefill_tflops = std::nan("");
  std::string version;
};

TorchResult RunTorch(const BenchFlags& flags) {
  TorchResult result;
  std::printf("\nPyTorch yardstick (bf16 eager loop over experts, same shape, %d threads)\n", flags.threads);
  if (!flags.torch) {
    std::printf("  skipped (--no-torch)\n");
    return result;
  }
  const std::string probe = absl::StrCat(ShellQuote(flags.python), " -c 'import torch' >/dev/null 2>&1");
  if (access(flags.python.c_str(), X_OK) != 0 || std::system(probe.c_str()) != 0) {
    std::printf("  skipped: %s cannot import torch\n", flags.python.c_str());
    return result;
  }
  std::vector<std::string> tried;
  const std::string script = FindTorchScript(flags, &tried);
  if (script.empty()) {
    std::printf("  skipped: %s not found (tried %s; set --torch-script or KT_TORCH_BENCH)\n", kTorchScript,
                absl::StrJoin(tried, ", ").c_str());
    return result;
  }
  const Shape& s = flags.shape;
  // Few prefill iterations: PyTorch's CPU bf16 matmuls may be slow on small machines.
  const std::string cmd = absl::StrCat(
      ShellQuote(flags.python), " ", ShellQuote(script), " --experts ", s.experts, " --topk ", s.top_k,
      " --hidden ", s.hidden, " --inter ", s.intermediate, " --threads ", flags.threads, " --qlen ",
      flags.qlen_decode, " ", flags.qlen_prefill, " --iters 20 2 --seed ", flags.seed, " 2>&1");
  std::printf("  $ %s\n", cmd.c_str());
  std::fflush(stdout);
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) {
    std::printf("  failed to start the script\n");
    return result;
  }
  char buf[4096];
  int parsed = 0;
  while (std::fgets(buf, sizeof(buf), pipe) != nullptr) {
    std::string line(buf);
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
    std::printf("  %s\n", line.c_str());
    std::fflush(stdout);
    if (line.empty() || line[0] != '{') continue;
    const double qlen = JsonNumber(line, "qlen");
    const double sec = JsonNumber(line, "seconds_per_iter");
    if (std::isnan(qlen) || std::isnan(sec)) continue;
    if (static_cast<int>(qlen) == flags.qlen_decode && std::isnan(result.decode_seconds)) {
      result.decode_seconds = sec;
      ++parsed;
    } else if (static_cast<int>(qlen) == flags.qlen_prefill) {
      result.prefill_seconds = sec;
      result.prefill_tflops = JsonNumber(line, "tflops");
      ++parsed;
    }
  }
  const int rc = pclose(pipe);
  if (rc != 0) std::printf("  the script exited with status %d\n", rc);
  result.ok = parsed > 0;
  return result;
}

// ---------------------------------------------------------------------------------------------------------
// kt bench

struct TimedRuns {
  std::vector<double> seconds;
  std::vector<double> bytes;  // Distinct expert weight bytes touched by each call.
  ForwardProfile phases;  // summed over the timed calls
};

// Where the calls' time went, phase by phase (MoeLayer::last_profile summed over the timed calls).
void PrintPhases(const TimedRuns& runs) {
  const ForwardProfile& p = runs.phases;
  const double n = static_cast<double>(std::max<size_t>(1, runs.seconds.size()));
  std::printf("  phases      mean per call (threads' busy time / threads): route %s, gather %s, "
              "gate/up+silu %s, quantize h %s, down+weighted sum %s\n",
              FormatTime(p.route / n).c_str(), FormatTime(p.gather / n).c_str(),
              FormatTime(p.gate_up / n).c_str(), FormatTime(p.quant_h / n).c_str(),
              FormatTime(p.down / n).c_str());
}

int Bench(const std::vector<std::string>& args) {
  const std::string usage = CommandUsage("kt bench [flags]", kBenchFlags);
  ParsedCommand parsed;
  if (const int code = ParseOrExit("bench", args, kBenchFlags, usage, &parsed); code >= 0) return code;
  absl::StatusOr<BenchFlags> flags_or = GetBenchFlags(parsed);
  if (!flags_or.ok()) return UsageError(absl::StrCat("bench: ", flags_or.status().message()), usage);
  BenchFlags flags = *std::move(flags_or);
  if (flags.threads == 0) flags.threads = HardwareThreads();
  cpu_set_t initial_affinity;
  CPU_ZERO(&initial_affinity);
  sched_getaffinity(0, sizeof(initial_affinity), &initial_affinity);

  const CpuFeatures& features = GetCpuFeatures();
  const absl::StatusOr<Isa> isa_or = SelectIsa();
  if (!isa_or.ok()) {
    std::fprintf(stderr, "kt bench: %s\n", std::string(isa_or.status().message()).c_str());
    return kExitUsage;
  }
  const Isa isa = *isa_or;
  const Shape& shape = flags.shape;
  const size_t E = shape.experts, H = shape.hidden, I = shape.intermediate;
  const int k = shape.top_k;
  // Bytes per expert; replaced by the packed size (scales included) once a layer is loaded.
  const double bytes_per_weight = flags.format == ExpertFormat::kBf16 ? sizeof(bf16_t)
                                  : flags.format == ExpertFormat::kInt8 ? 1.0
                                                                        : 0.5;
  double expert_bytes = 3.0 * H * I * bytes_per_weight;
  const double flop_per_routed_row = 2.0 * 3.0 * H * I;
  const char* format = ExpertFormatName(flags.format);

  std::printf("kt bench: %s routed experts of one MoE layer\n", format);
  std::printf("  CPU        %s\n", features.brand.empty() ? "(unknown brand)" : features.brand.c_str());
  std::printf("  features   %s\n", features.ToString().c_str());
  std::printf("  path       %s (%s)\n", IsaName(isa), IsaOrigin().c_str());
  std::printf("  threads    %d%s\n", flags.threads, flags.pin ? " (pinned)" : "");
  std::printf(
      "  shape      %s: E=%zu experts, top-k=%d, hidden=%zu, intermediate=%zu; %s of %s expert "
      "weights per layer, %d layers\n",
      shape.name, E, k, H, I, FormatBytes(expert_bytes * E).c_str(), format, shape.layers);
  std::fflush(stdout);

  // Yardsticks first, while the weights are not yet allocated.
  std::printf("\nYardsticks (measured in this run, %d threads)\n", flags.threads);
  std::fflush(stdout);
  const BandwidthResult bw =
      MeasureReadBandwidth(static_cast<size_t>(flags.bandwidth_mib) << 20, flags.threads, 10, flags.pin);
  if (bw.bytes_per_second <= 0) {
    std::fprintf(stderr, "kt bench: could not allocate %d MiB for the bandwidth measurement\n",
                 flags.bandwidth_mib);
    return 1;
  }
  std::printf("  read bandwidth  %7.1f GB/s    (streaming read of %zu MiB, %s, best of %d)\n",
              bw.bytes_per_second / 1e9, bw.buffer_bytes >> 20, bw.method.c_str(), bw.reps);
  std::fflush(stdout);
  // The yardstick of the format's kernels: bf16/fp32 instructions, or the int8 ones for quantized experts.
  const bool int_kernels = flags.format != ExpertFormat::kBf16;
  const PeakResult peak = MeasurePeak(isa, flags.threads, flags.pin, 0.2, 5,
                                      int_kernels ? PeakOperands::kInt8 : PeakOperands::kFloat);
  const char* peak_unit = int_kernels ? "TOPS" : "TFLOPS";
  std::printf(
      "  peak compute    %7.3f %-6s  (%s path: %s, %d %s each, %d independent chains per thread, "
      "best of %d)\n",
      peak.flops_per_second / 1e12, peak_unit, IsaName(isa), peak.instruction.c_str(),
      peak.flop_per_instruction, int_kernels ? "ops" : "FLOP", peak.chains, peak.reps);
  std::fflush(stdout);

  ThreadPool pool(ThreadPoolOptions{flags.threads, flags.pin});
  MoeConfig config;
  config.num_experts = shape.experts;
  config.top_k = k;
  config.hidden = shape.hidden;
  config.intermediate = shape.intermediate;
  config.max_len = std::max({flags.qlen_decode, flags.qlen_prefill, kAccuracyQlen});
  config.group_size = flags.group_size;

  // Weights: uniform with standard deviation 1/sqrt(fan_in), deterministic in --seed.
  Clock::time_point t0 = Clock::now();
  const size_t n_gu = E * I * H;
  std::unique_ptr<bf16_t[]> gate(new bf16_t[n_gu]), up(new bf16_t[n_gu]), down(new bf16_t[n_gu]);
  FillRandomBf16(pool, flags.seed * 16 + 1, n_gu, 1.0f / std::sqrt(static_cast<float>(H)), gate.get());
  FillRandomBf16(pool, flags.seed * 16 + 2, n_gu, 1.0f / std::sqrt(static_cast<float>(H)), up.get());
  FillRandomBf16(pool, flags.seed * 16 + 3, n_gu, 1.0f / std::sqrt(static_cast<float>(I)), down.get());
  const double gen_s = Seconds(t0);

  // Several layers (copies of the same values in distinct memory) where one layer would not dwarf the
  // last-level cache, so that the timed calls read their weights from DRAM as a real model does.
  const size_t llc = LastLevelCacheBytes();
  int num_layers = flags.layers;
  if (num_layers == 0) {
    const double want = 4.0 * static_cast<double>(llc) / (expert_bytes * E);
    // At most half of the physical memory for the copies (the canonical weights are held meanwhile).
    const double ram = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
    const int fit = static_cast<int>(0.5 * ram / (expert_bytes * E)) - 1;
    num_layers = std::max(1, std::min({shape.layers, fit, static_cast<int>(std::ceil(want))}));
  }
  std::vector<std::unique_ptr<MoeLayer>> layers;
  t0 = Clock::now();
  for (int l = 0; l < num_layers; ++l) {
    absl::StatusOr<std::unique_ptr<MoeLayer>> moe_or = MoeLayer::Create(config, isa, flags.format);
    if (!moe_or.ok()) {
      std::fprintf(stderr, "kt bench: MoeLayer::Create: %s\n", moe_or.status().ToString().c_str());
      return 1;
    }
    if (const absl::Status t = (*moe_or)->SetTiling(flags.tiling); !t.ok()) {
      std::fprintf(stderr, "kt bench: --tiling: %s\n", t.ToString().c_str());
      return 1;
    }
    const absl::Status load = (*moe_or)->LoadWeights(gate.get(), up.get(), down.get(), nullptr, pool);
    if (!load.ok()) {
      std::fprintf(stderr, "kt bench: LoadWeights: %s\n", load.ToString().c_str());
      return 1;
    }
    layers.push_back(std::move(*moe_or));
  }
  const double load_s = Seconds(t0);
  MoeLayer& moe = *layers[0];
  expert_bytes = static_cast<double>(moe.weight_bytes()) / E;
  absl::Status st;
  std::printf(
      "\nWeights    random bf16, std 1/sqrt(fan_in), seed %llu: generated in %.1f s, packed in %.1f s\n"
      "           %d layer cop%s in distinct memory, %s packed in all (last-level cache %s%s)\n",
      static_cast<unsigned long long>(flags.seed), gen_s, load_s, num_layers, num_layers == 1 ? "y" : "ies",
      FormatBytes(static_cast<double>(moe.weight_bytes()) * num_layers).c_str(),
      llc > 0 ? FormatBytes(static_cast<double>(llc)).c_str() : "unknown",
      flags.layers == 0 ? "; copies chosen to exceed 4x the cache, --layers overrides" : "");

  std::mt19937_64 rng(flags.seed);
  auto random_input = [&](int qlen, uint64_t stream) {
    std::vector<bf16_t> x(static_cast<size_t>(qlen) * H);
    for (size_t i = 0; i < x.size(); ++i) x[i] = F32ToBf16(std::sqrt(3.0f) * UniformSym(Mix(stream), i));
    return x;
  };

  // Accuracy against the double-accumulation reference.
  bool accuracy_pass = false;
  {
    const Routing r = RandomRouting(rng, kAccuracyQlen, k, shape.experts);
    const std::vector<bf16_t> x = random_input(kAccuracyQlen, flags.seed * 16 + 4);
    std::vector<bf16_t> y(static_cast<size_t>(kAccuracyQlen) * H);
    st = moe.Forward(pool, kAccuracyQlen, k, r.ids.data(), r.weights.data(), x.data(), y.data(), nullptr);
    if (!st.ok()) {
      std::fprintf(stderr, "kt bench: Forward: %s\n", st.ToString().c_str());
      return 1;
    }
    std::vector<float> ref(y.size());
    MoeForwardReference(config, kAccuracyQlen, k, r.ids.data(), r.weights.data(), x.data(), gate.get(),
                        up.get(), down.get(), nullptr, ref.data(), flags.format);
    double max_err = 0, max_ref = 0;
    bool finite = true;
    for (size_t i = 0; i < y.size(); ++i) {
      const double v = Bf16ToF32(y[i]);
      if (!std::isfinite(v)) finite = false;
      max_err = std::max(max_err, std::fabs(v - ref[i]));
      max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[i])));
    }
    const double rel = max_ref > 0 ? max_err / max_ref : (max_err > 0 ? INFINITY : 0.0);
    accuracy_pass = finite && max_ref > 0 && rel < kAccuracyTolerance;
    std::printf(
        "Accuracy   qlen %d vs MoeForwardReference (double accumulation): max|err|/max|ref| = "
        "%.2e (max|ref| %.3g)  %s (< %.0e)\n",
        kAccuracyQlen, rel, max_ref, accuracy_pass ? "PASS" : "FAIL", kAccuracyTolerance);
    if (flags.format != ExpertFormat::kBf16) {
      // The format's own error: against the bf16 model, as the original's accuracy tests measure it.
      std::vector<float> bf16_ref(y.size());
      MoeForwardReference(config, kAccuracyQlen, k, r.ids.data(), r.weights.data(), x.data(), gate.get(),
                          up.get(), down.get(), nullptr, bf16_ref.data(), ExpertFormat::kBf16);
      double sum_err = 0, sum_ref = 0;
      for (size_t i = 0; i < y.size(); ++i) {
        sum_err += std::fabs(Bf16ToF32(y[i]) - bf16_ref[i]);
        sum_ref += std::fabs(static_cast<double>(bf16_ref[i]));
      }
      std::printf("           %s format vs the bf16 model: mean|err|/mean|ref| = %.4f\n", format,
                  sum_ref > 0 ? sum_err / sum_ref : 0.0);
    }
  }
  gate.reset();
  up.reset();
  down.reset();
  std::fflush(stdout);

  // Runs `iters` timed calls after `warmup` untimed ones, cycling through `patterns` routings.
  auto run = [&](int qlen, int iters, int warmup, const std::vector<Routing>& patterns,
                 TimedRuns* out) -> absl::Status {
    const std::vector<bf16_t> x = random_input(qlen, flags.seed * 16 + 5 + qlen);
    std::vector<bf16_t> y(static_cast<size_t>(qlen) * H);
    for (int it = -warmup; it < iters; ++it) {
      const Routing& r = patterns[(it + warmup) % patterns.size()];
      MoeLayer& layer = *layers[(it + warmup) % layers.size()];
      const Clock::time_point start = Clock::now();
      absl::Status s =
          layer.Forward(pool, qlen, k, r.ids.data(), r.weights.data(), x.data(), y.data(), nullptr);
      const double sec = Seconds(start);
      if (!s.ok()) return s;
      if (it >= 0) {
        out->seconds.push_back(sec);
        out->bytes.push_back(r.distinct_experts * expert_bytes);
        const ForwardProfile& p = layer.last_profile();
        ForwardProfile& sum = out->phases;
        sum.route += p.route;
        sum.gather += p.gather;
        sum.gate_up += p.gate_up;
        sum.quant_h += p.quant_h;
        sum.down += p.down;
      }
    }
    return absl::OkStatus();
  };

  // Decode: many routing patterns so that consecutive calls touch different experts, and one layer of
  // weights (>> last-level cache) so that the cache cannot serve them.
  TimedRuns dec;
  {
    std::vector<Routing> patterns;
    const int num_patterns = std::min(64, std::max(flags.iters, 1) + 3);
    for (int p = 0; p < num_patterns; ++p)
      patterns.push_back(RandomRouting(rng, flags.qlen_decode, k, shape.experts));
    st = run(flags.qlen_decode, flags.iters, std::max<int>(3, layers.size()), patterns, &dec);
    if (!st.ok()) {
      std::fprintf(stderr, "kt bench: Forward (decode): %s\n", st.ToString().c_str());
      return 1;
    }
    std::vector<double> gbps(dec.seconds.size());
    for (size_t i = 0; i < gbps.size(); ++i) gbps[i] = dec.bytes[i] / dec.seconds[i] / 1e9;
    const double med = Percentile(dec.seconds, 0.5);
    const double med_gbps = Percentile(gbps, 0.5);
    // The read bandwidth of a VM can move by +-20% between minutes, so the yardstick is measured again
    // right after the decode loop and the larger of the two readings is the one the decode rate is
    // compared with.
    const BandwidthResult bw_after =
        MeasureReadBandwidth(static_cast<size_t>(flags.bandwidth_mib) << 20, flags.threads, 10, flags.pin);
    const double bw_gbps = std::max(bw.bytes_per_second, bw_after.bytes_per_second) / 1e9;
    std::printf("\nDecode     qlen %d, %d iterations over %d routing patterns and %d layer cop%s\n",
                flags.qlen_decode, flags.iters, num_patterns, num_layers, num_layers == 1 ? "y" : "ies");
    std::printf("  latency     median %s per layer  (p10 %s, p90 %s)\n", FormatTime(med).c_str(),
                FormatTime(Percentile(dec.seconds, 0.1)).c_str(),
                FormatTime(Percentile(dec.seconds, 0.9)).c_str());
    std::printf(
        "  tokens/s    %.1f for one layer; %.2f for a %d-layer model (extrapolation: routed experts "
        "only, x%d layers)\n",
        flags.qlen_decode / med, flags.qlen_decode / (med * shape.layers), shape.layers, shape.layers);
    std::printf(
        "  weights     %s of distinct experts touched per call (median) -> %.1f GB/s = %.0f%% of the "
        "measured read bandwidth %.1f GB/s (the larger of %.1f before and %.1f right after the decode loop)\n",
        FormatBytes(Percentile(dec.bytes, 0.5)).c_str(), med_gbps, 100.0 * med_gbps / bw_gbps, bw_gbps,
        bw.bytes_per_second / 1e9, bw_after.bytes_per_second / 1e9);
    PrintPhases(dec);
    std::fflush(stdout);
  }

  // Prefill.
  TimedRuns pre;
  {
    std::vector<Routing> patterns;
    for (int p = 0; p < std::min(flags.prefill_iters + 1, 8); ++p) {
      patterns.push_back(RandomRouting(rng, flags.qlen_prefill, k, shape.experts));
    }
    // One untimed call per layer copy: a layer's first prefill page-faults its scratch in, which would make
    // the first timed call of each copy several times slower than the others.
    st = run(flags.qlen_prefill, flags.prefill_iters, static_cast<int>(layers.size()), patterns, &pre);
    if (!st.ok()) {
      std::fprintf(stderr, "kt bench: Forward (prefill): %s\n", st.ToString().c_str());
      return 1;
    }
    const double med = Percentile(pre.seconds, 0.5);
    const double flop = flop_per_routed_row * k * flags.qlen_prefill;
    const double tflops = flop / med / 1e12;
    const double peak_tflops = peak.flops_per_second / 1e12;
    const double med_bytes = Percentile(pre.bytes, 0.5);
    std::printf("\nPrefill    qlen %d, %d iterations\n", flags.qlen_prefill, flags.prefill_iters);
    std::printf("  latency     median %s per layer  (min %s, max %s); %.0f tokens/s for one layer\n",
                FormatTime(med).c_str(), FormatTime(Percentile(pre.seconds, 0.0)).c_str(),
                FormatTime(Percentile(pre.seconds, 1.0)).c_str(), flags.qlen_prefill / med);
    PrintPhases(pre);
    std::printf("  calls      ");
    for (double sec : pre.seconds) std::printf(" %s", FormatTime(sec).c_str());
    std::printf("\n");
    std::printf("  compute     %.3f %s = %.0f%% of the measured %s peak %.3f %s (%s)%s\n", tflops, peak_unit,
                100.0 * tflops / peak_tflops, IsaName(isa), peak_tflops, peak_unit, peak.instruction.c_str(),
                int_kernels ? "; integer multiply-adds count 2 ops" : "");
    std::printf(
        "  weights     %.0f distinct experts, %s touched per call -> %.1f GB/s (read bandwidth "
        "%.1f GB/s)\n",
        med_bytes / expert_bytes, FormatBytes(med_bytes).c_str(), med_bytes / med / 1e9,
        bw.bytes_per_second / 1e9);
    std::fflush(stdout);
  }

  // Tiling sweep: the same prefill (layers, routings, input) under each tiling, one warm-up call per layer.
  for (const MoeTiling& t : flags.sweep) {
    for (auto& layer : layers) {
      if (const absl::Status ts = layer->SetTiling(t); !ts.ok()) {
        std::fprintf(stderr, "kt bench: --sweep-tiling: %s\n", ts.ToString().c_str());
        return 1;
      }
    }
    std::vector<Routing> patterns;
    std::mt19937_64 sweep_rng(flags.seed + 7);
    for (int p = 0; p < std::min(flags.prefill_iters + 1, 8); ++p) {
      patterns.push_back(RandomRouting(sweep_rng, flags.qlen_prefill, k, shape.experts));
    }
    TimedRuns sw;
    st = run(flags.qlen_prefill, flags.prefill_iters, static_cast<int>(layers.size()), patterns, &sw);
    if (!st.ok()) {
      std::fprintf(stderr, "kt bench: Forward (sweep): %s\n", st.ToString().c_str());
      return 1;
    }
    const double med = Percentile(sw.seconds, 0.5);
    const double n = static_cast<double>(sw.seconds.size());
    std::printf("Sweep      tiling %d,%d,%d,%d: prefill qlen %d median %s (min %s), %.3f %s; gate/up %s, "
                "down+weighted sum %s\n",
                t.gate_up_panels, t.down_panels, t.row_chunk, t.k_block, flags.qlen_prefill, FormatTime(med).c_str(),
                FormatTime(Percentile(sw.seconds, 0.0)).c_str(),
                flop_per_routed_row * k * flags.qlen_prefill / med / 1e12, peak_unit,
                FormatTime(sw.phases.gate_up / n).c_str(), FormatTime(sw.phases.down / n).c_str());
    std::fflush(stdout);
  }

  // ThreadPoolOptions::pin pins the calling thread too, and a child process inherits that thread's
  // affinity: give PyTorch back every CPU this process started with.
  sched_setaffinity(0, sizeof(initial_affinity), &initial_affinity);
  const TorchResult torch = RunTorch(flags);
  if (torch.ok) {
    const double kt_dec = Percentile(dec.seconds, 0.5);
    const double kt_pre = Percentile(pre.seconds, 0.5);
    if (!std::isnan(torch.decode_seconds)) {
      std::printf("  decode   qlen %-4d kt %s vs torch %s per layer -> kt/torch speed %.2fx\n",
                  flags.qlen_decode, FormatTime(kt_dec).c_str(), FormatTime(torch.decode_seconds).c_str(),
                  torch.decode_seconds / kt_dec);
    }
    if (!std::isnan(torch.prefill_seconds)) {
      const double flop = flop_per_routed_row * k * flags.qlen_prefill;
      std::printf(
          "  prefill  qlen %-4d kt %s (%.3f TFLOPS) vs torch %s (%.3f TFLOPS) per layer -> kt/torch speed "
          "%.2fx\n",
          flags.qlen_prefill, FormatTime(kt_pre).c_str(), flop / kt_pre / 1e12,
          FormatTime(torch.prefill_seconds).c_str(), flop / torch.prefill_seconds / 1e12,
          torch.prefill_seconds / kt_pre);
    }
  }
  std::fflush(stdout);
  if (!accuracy_pass) {
    std::fprintf(stderr, "kt bench: accuracy check FAILED\n");
    return 1;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------------------
// kt convert

constexpr const char* kConvertEpilogue =
    R"(
Progress (one line per layer, with GB/s and ETA) goes to stderr. Exit 0 on success, 1 on a conversion error
(the message names the file and tensor; no finished-looking output is left), 2 on a usage error.
)";

int Convert(const std::vector<std::string>& args) {
  const std::string usage = CommandUsage("kt convert --input HF_DIR --output OUT_DIR --method METHOD [flags]",
                                         kConvertFlags, kConvertEpilogue);
  ParsedCommand parsed;
  if (const int code = ParseOrExit("convert", args, kConvertFlags, usage, &parsed); code >= 0) return code;
  ConvertOptions options;
  options.input = absl::GetFlag(FLAGS_input);
  options.output = absl::GetFlag(FLAGS_output);
  options.method = absl::GetFlag(FLAGS_method);
  // 0 unless given: ConvertCheckpoint refuses a group size for a method without groups, so the flag's
  // default (128, which the k-group methods take when it is 0) must not count as given.
  const bool group_given =
      std::find(parsed.set.begin(), parsed.set.end(), std::string("group_size")) != parsed.set.end();
  options.group_size = group_given ? absl::GetFlag(FLAGS_group_size) : 0;
  options.threads = absl::GetFlag(FLAGS_threads);
  if (options.input.empty() || options.output.empty() || options.method.empty()) {
    return UsageError("convert: --input, --output and --method are required", usage);
  }
  // Ctrl-C or SIGTERM mid-layer removes the layer's temporary file and says so.
  InstallInterruptCleanup("kt convert");
  absl::StatusOr<ConvertStats> stats = ConvertCheckpoint(options);
  if (!stats.ok()) {
    std::fprintf(stderr, "kt convert: %s\n", std::string(stats.status().message()).c_str());
    return stats.status().code() == absl::StatusCode::kInvalidArgument &&
                   absl::StrContains(stats.status().message(), "unknown method")
               ? kExitUsage
               : 1;
  }
  std::fprintf(stderr,
               "kt convert: done: %d MoE layers (%d converted, %d kept from an earlier run), %.2f GB read, "
               "%.2f GB written in %.1f s (%.2f GB/s read)\n",
               stats->layers_total, stats->layers_converted, stats->layers_skipped, stats->bytes_read / 1e9,
               stats->bytes_written / 1e9, stats->seconds, stats->bytes_read / 1e9 / std::max(stats->seconds, 1e-9));
  return 0;
}

int Main(int argc, char** argv) {
  if (argc < 2) return UsageError("missing command", kUsage);
  const std::string cmd = argv[1];
  const std::vector<std::string> rest(argv + 2, argv + argc);
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::printf("%s", kUsage);
    return 0;
  }
  if (cmd == "--version") return Version();
  if (cmd == "bench") return Bench(rest);
  if (cmd == "doctor") return Doctor(rest);
  if (cmd == "convert") return Convert(rest);
  return UsageError(absl::StrCat(cmd.rfind("-", 0) == 0 ? "unknown flag '" : "unknown command '", cmd, "'"),
                    kUsage);
}

}  // namespace
}  // namespace tools
}  // namespace kt

int main(int argc, char** argv) { return kt::tools::Main(argc, argv); }
