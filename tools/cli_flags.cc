#include "tools/cli_flags.h"

#include <algorithm>
#include <limits>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/reflection.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/types/optional.h"

namespace kt {
namespace tools {
namespace {

constexpr size_t kUsageWidth = 100;
constexpr const char* kHelpIndent = "      ";

const FlagSpec* FindSpec(absl::Span<const FlagSpec> specs, const std::string& name) {
  for (const FlagSpec& s : specs) {
    if (name == s.name) return &s;
  }
  return nullptr;
}

// The value of an int or int64 flag, if it is one.
absl::optional<int64_t> IntValue(const absl::CommandLineFlag& flag) {
  if (flag.IsOfType<int>()) return flag.TryGet<int>();
  if (flag.IsOfType<int64_t>()) return flag.TryGet<int64_t>();
  return absl::nullopt;
}

// Abseil reports a rejected value as "Illegal value '<v>' specified for flag '<name>'" and, when the type's
// parser said why, "; <why>". Returns the why, or "".
std::string ParseFailureDetail(const std::string& error) {
  const size_t at = error.find("'; ");
  return at == std::string::npos ? "" : error.substr(at + 3);
}

}  // namespace

std::string FlagArg(const std::string& name) {
  return absl::StrCat("--", absl::StrReplaceAll(name, {{"_", "-"}}));
}

absl::StatusOr<ParsedCommand> ParseCommandFlags(absl::Span<const std::string> args,
                                                absl::Span<const FlagSpec> specs) {
  ParsedCommand parsed;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--help" || arg == "-h") {
      parsed.help = true;
      return parsed;
    }
    if (arg.size() < 3 || arg.rfind("--", 0) != 0) {
      const bool flag_like = arg.rfind("-", 0) == 0;
      return absl::InvalidArgumentError(
          absl::StrCat(flag_like ? "unknown flag '" : "unexpected argument '", arg, "'"));
    }
    const size_t eq = arg.find('=');
    const std::string spelled = arg.substr(0, eq);
    const std::string name = absl::StrReplaceAll(spelled.substr(2), {{"-", "_"}});
    const FlagSpec* spec = FindSpec(specs, name);
    absl::CommandLineFlag* flag = spec == nullptr ? nullptr : absl::FindCommandLineFlag(name);
    if (flag == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown flag '", spelled, "'"));
    std::string value;
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
    } else if (flag->IsOfType<bool>()) {
      value = "true";
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      return absl::InvalidArgumentError(absl::StrCat("flag ", spelled, " needs a value"));
    }
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      const std::string why = ParseFailureDetail(error);
      return absl::InvalidArgumentError(
          absl::StrCat("flag ", spelled, ": invalid value '", value, "'", why.empty() ? "" : ": ", why));
    }
    if (const absl::optional<int64_t> v = IntValue(*flag); v && (*v < spec->min || *v > spec->max)) {
      return absl::InvalidArgumentError(absl::StrCat("flag ", spelled, " wants an integer in [", spec->min,
                                                     ", ", spec->max, "], got '", value, "'"));
    }
    parsed.set.push_back(name);
  }
  return parsed;
}

std::string FlagsUsage(absl::Span<const FlagSpec> specs) {
  std::string out;
  for (const FlagSpec& spec : specs) {
    const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(spec.name);
    if (flag == nullptr) continue;
    const std::string def = flag->DefaultValue();
    absl::StrAppend(&out, "  ", FlagArg(spec.name),
                    flag->IsOfType<bool>() ? "" : absl::StrCat("=", def.empty() ? "\"\"" : def), "\n");
    std::string help = flag->Help();
    if (spec.max < std::numeric_limits<int>::max()) {
      absl::StrAppend(&help, " (an integer in [", spec.min, ", ", spec.max, "])");
    } else if (spec.min != FlagSpec{}.min) {
      absl::StrAppend(&help, " (an integer >= ", spec.min, ")");
    }
    std::string line = kHelpIndent;
    for (absl::string_view word : absl::StrSplit(help, ' ', absl::SkipEmpty())) {
      if (line.size() > std::string(kHelpIndent).size() && line.size() + 1 + word.size() > kUsageWidth) {
        absl::StrAppend(&out, line, "\n");
        line = kHelpIndent;
      }
      absl::StrAppend(&line, line.size() > std::string(kHelpIndent).size() ? " " : "", word);
    }
    absl::StrAppend(&out, line, "\n");
  }
  return out;
}

}  // namespace tools
}  // namespace kt
