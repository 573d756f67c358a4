// kt: the command line tool.
//
//   kt bench [flags]   Benchmarks the routed experts of one MoE layer (decode and prefill), synthetic or read
//                      from a weight folder (--weights), and prints every rate beside a yardstick measured in
//                      the same run: GB/s beside the machine's read bandwidth, TFLOPS beside the kernel
//                      path's peak, speed beside PyTorch (tools/bench.h).
//   kt doctor          CPU, features, kernel paths, what KT_ISA resolves to.
//   kt convert         Converts a Hugging Face checkpoint (or a GGUF one) into kt's converted folder for one
//                      method (kt/io/convert.h): streaming, resumable, atomic, with a checksummed manifest.
//   kt --version       The version and the kernel path this process selects.
//
// Every flag is an ABSL_FLAG below; each command lists the flags it accepts (kBenchFlags, kConvertFlags) and
// tools/cli_flags.h parses them and generates their usage text. Exit codes: 0 success (and --help), 1 a
// failed run, 2 a usage error (unknown command or flag, bad value: the message names it).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kt/io/convert.h"
#include "kt/io/file_util.h"
#include "kt/kernels/cpu_features.h"
#include "kt/moe/moe_layer.h"
#include "tools/bench.h"
#include "tools/cli_flags.h"
#include "tools/isa_choice.h"
#include "tools/parallel.h"

namespace kt {
namespace tools {

// Flag value types (Abseil finds AbslParseFlag / AbslUnparseFlag next to the type).

struct ShapeFlag {
  const BenchShape* shape = &BenchShapes()[0];
};

bool AbslParseFlag(absl::string_view text, ShapeFlag* out, std::string* error) {
  for (const BenchShape& shape : BenchShapes()) {
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
          "activations), mxfp4 or mxfp8 (OCP MX: E2M1 / E4M3 with an E8M0 scale per 32 k, bf16 "
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
ABSL_FLAG(std::string, weights, "",
          "bench a real layer from this folder (Hugging Face bf16, or kt convert output) instead of a synthetic "
          "one: the shape comes from its config.json (--shape and --format do not apply), the format from "
          "--method");
ABSL_FLAG(int, layer, -1, "with --weights: the MoE layer to bench (-1: the folder's first MoE layer)");

// Flags of `kt convert`.
ABSL_FLAG(std::string, input, "",
          "required: Hugging Face folder: config.json + model.safetensors (or a sharded index), bf16 experts "
          "(or FP8 with 128x128 block scales, for --method FP8; or native int4: compressed-tensors pack-quantized "
          "or GPTQ sym, as stored for RAWINT4 / GPTQ_INT4, dequantized for any other method); or a GGUF "
          "checkpoint: a .gguf file, a part of a split set, or a folder of .gguf files (expert types Q4_0 .. Q8_0, "
          "Q2_K .. Q6_K, BF16, F16, F32, dequantized for any method but LLAMAFILE, which runs GGUF as stored)");
ABSL_FLAG(std::string, output, "",
          "required: created if missing; rerunning into it resumes (layers whose checksums verify are kept)");
ABSL_FLAG(std::string, method, "",
          "convert (required): BF16 | AMXINT8 | MOE_INT8 | AMXINT4 | MOE_INT4 | RAWINT4 | GPTQ_INT4 | "
          "AMXINT4_KGroup | AMXINT4_1KGroup | FP8 (an FP8 folder is copied as stored; a native int4 one for RAWINT4 / "
          "GPTQ_INT4) (docs/FORMATS.md: method -> "
          "layout); bench --weights: the "
          "KTMoEWrapper method the layer is loaded with (empty: a converted folder's own, else BF16)");

// Flags of both.
ABSL_FLAG(int, threads, 0,
          "threads (bench: kt, the yardsticks and PyTorch; convert: quantization); 0: the CPUs in this "
          "process's affinity mask");
ABSL_FLAG(int, group_size, 128,
          "group of the k-group int4 formats (bench: --format int4_group_*, 32, 64 or 128; convert: "
          "AMXINT4_KGroup / AMXINT4_1KGroup, and RAWINT4 / GPTQ_INT4 from a bf16 folder: a native int4 one keeps its "
          "own)");

namespace kt {
namespace tools {
namespace {

// The version of kt (the Python package's kt/python/kt_kernel/_version.py says the same; kt_cli_test
// checks it).
constexpr const char* kVersion = "0.1.0";
constexpr int kExitUsage = 2;

// ---------------------------------------------------------------------------------------------------------
// Usage.

constexpr const char* kUsage =
    R"(usage: kt <command> [flags]
       kt --version    the version and the kernel path this process selects
       kt --help

commands:
  bench    benchmark the routed experts of one MoE layer (decode + prefill), synthetic or a real one
           (--weights DIR), with yardsticks measured in the same run: read bandwidth, the kernel path's
           peak compute, and PyTorch
  doctor   print the CPU, its features, every kernel path (supported or not) and what KT_ISA selects
  convert  convert a checkpoint's routed experts (Hugging Face, or GGUF) for one method

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
    {"weights"},
    {"layer", 0, 1 << 20},
    {"method"},
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
  flags.weights = absl::GetFlag(FLAGS_weights);
  flags.layer = absl::GetFlag(FLAGS_layer);
  flags.method = absl::GetFlag(FLAGS_method);
  auto given = [&](const std::string& name) {
    return std::find(parsed.set.begin(), parsed.set.end(), name) != parsed.set.end();
  };
  // A synthetic layer is described by --shape and --format, a folder's by its config.json and --method.
  for (const char* name : {"layer", "method"}) {
    if (flags.weights.empty() && given(name)) {
      return absl::InvalidArgumentError(absl::StrCat("flag ", FlagArg(name), " needs --weights DIR"));
    }
  }
  for (const char* name : {"shape", "format"}) {
    if (!flags.weights.empty() && given(name)) {
      return absl::InvalidArgumentError(absl::StrCat("flag ", FlagArg(name), " does not apply with --weights: ",
                                                     "the folder's config.json gives the shape, --method the "
                                                     "format"));
    }
  }
  const std::vector<MoeTiling> tiling = absl::GetFlag(FLAGS_tiling).tilings;
  flags.sweep = absl::GetFlag(FLAGS_sweep_tiling).tilings;
  if (tiling.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("flag --tiling '", AbslUnparseFlag(TilingsFlag{tiling}),
                                                   "': expected one G,D[,R[,KB]]"));
  }
  flags.tiling = tiling[0];
  if (given("sweep_tiling") && flags.sweep.empty()) {
    return absl::InvalidArgumentError("flag --sweep-tiling: expected at least one G,D[,R[,KB]]");
  }
  if (flags.group_size != 32 && flags.group_size != 64 && flags.group_size != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --group-size ", flags.group_size, ": expected 32, 64 or 128"));
  }
  return flags;
}

int Bench(const std::vector<std::string>& args) {
  const std::string usage = CommandUsage("kt bench [flags]", kBenchFlags);
  ParsedCommand parsed;
  if (const int code = ParseOrExit("bench", args, kBenchFlags, usage, &parsed); code >= 0) return code;
  absl::StatusOr<BenchFlags> flags = GetBenchFlags(parsed);
  if (!flags.ok()) return UsageError(absl::StrCat("bench: ", flags.status().message()), usage);
  return RunBench(*std::move(flags));
}

// ---------------------------------------------------------------------------------------------------------
// kt convert

constexpr const char* kConvertEpilogue =
    R"(
Progress (one line per layer, with GB/s and ETA) goes to stderr. Exit 0 on success, 1 on a conversion error
(the message names the file and tensor; no finished-looking output is left), 2 on a usage error.
)";

int Convert(const std::vector<std::string>& args) {
  const std::string usage = CommandUsage("kt convert --input HF_DIR|MODEL.gguf --output OUT_DIR --method METHOD [flags]",
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
