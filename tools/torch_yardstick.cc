#include "tools/torch_yardstick.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace kt {
namespace tools {
namespace {

constexpr const char* kTorchScript = "tools/torch_moe_bench.py";

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
std::string FindTorchScript(const TorchRequest& flags, std::vector<std::string>* tried) {
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

}  // namespace

// A bare name is looked up in $PATH's folders: access() alone would take it as a file in the working
// directory, which turned `--python python3` into "cannot import torch" (2026-12-07, the AMX host).
bool Runnable(const std::string& name) {
  if (name.empty()) return false;
  if (name.find('/') != std::string::npos) return access(name.c_str(), X_OK) == 0;
  const char* path = std::getenv("PATH");
  if (path == nullptr) return false;
  for (absl::string_view dir : absl::StrSplit(path, ':')) {
    const std::string candidate = absl::StrCat(dir.empty() ? "." : dir, "/", name);
    if (access(candidate.c_str(), X_OK) == 0) return true;
  }
  return false;
}

TorchResult RunTorch(const TorchRequest& flags) {
  TorchResult result;
  std::printf("\nPyTorch yardstick (bf16 eager loop over experts, same shape, %d threads)\n", flags.threads);
  if (!flags.enabled) {
    std::printf("  skipped (--no-torch)\n");
    return result;
  }
  const std::string probe = absl::StrCat(ShellQuote(flags.python), " -c 'import torch' >/dev/null 2>&1");
  if (!Runnable(flags.python)) {
    std::printf("  skipped: %s is not an executable path nor a command on $PATH\n", flags.python.c_str());
    return result;
  }
  if (std::system(probe.c_str()) != 0) {
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
  const TorchRequest& s = flags;
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
      result.dense_seconds = JsonNumber(line, "dense_seconds");
      result.dense_tflops = JsonNumber(line, "dense_tflops");
      result.dense_int8_seconds = JsonNumber(line, "dense_int8_seconds");
      result.dense_int8_tops = JsonNumber(line, "dense_int8_tops");
      ++parsed;
    }
  }
  const int rc = pclose(pipe);
  if (rc != 0) std::printf("  the script exited with status %d\n", rc);
  result.ok = parsed > 0;
  return result;
}

void PrintDenseComparison(const TorchResult& r, double kt_pre) {
  if (!std::isnan(r.dense_seconds)) {
    std::printf("  dense    bf16 torch.bmm, balanced routing, same FLOPs: %.2f ms (%.3f TFLOPS) -> kt/dense speed %.2fx\n",
                r.dense_seconds * 1e3, r.dense_tflops, r.dense_seconds / kt_pre);
  }
  if (!std::isnan(r.dense_int8_seconds)) {
    std::printf("  dense    int8 torch._int_mm per expert, no activation quantization: %.2f ms (%.3f TOPS) -> kt/dense "
                "speed %.2fx\n",
                r.dense_int8_seconds * 1e3, r.dense_int8_tops, r.dense_int8_seconds / kt_pre);
  }
  std::fflush(stdout);
}

}  // namespace tools
}  // namespace kt
