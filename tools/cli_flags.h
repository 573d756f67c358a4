// Subcommand flags on Abseil's flag registry. Every flag of the `kt` tool is an ABSL_FLAG (its type, default
// and help text live in its definition); each subcommand names the flags it accepts, and ParseCommandFlags
// sets those from the arguments that follow the subcommand. Only the public API of absl/flags is used
// (FindCommandLineFlag, CommandLineFlag::ParseFrom / TryGet / Help / DefaultValue): absl::ParseCommandLine
// would accept every flag of every command, and in Abseil 20220623 exits 1 on `--help` and on an unknown
// flag, where `kt` answers 0 and 2.
//
// Spelling on the command line: `--name=value` or `--name value`; a bool flag alone (`--pin`) is true and
// also takes `--name=true|false`; dashes in a name stand for the underscores of the flag's C++ name
// (`--qlen-decode` sets FLAGS_qlen_decode). `--help` and `-h` ask for the command's usage.
#ifndef KT_TOOLS_CLI_FLAGS_H_
#define KT_TOOLS_CLI_FLAGS_H_

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kt {
namespace tools {

// One flag a command accepts: the C++ name of its ABSL_FLAG and, for an int flag, the range a value given on
// the command line must fall in (the default may lie outside it as a sentinel, e.g. 0 for "automatic").
struct FlagSpec {
  const char* name;
  int64_t min = std::numeric_limits<int64_t>::min();
  int64_t max = std::numeric_limits<int64_t>::max();
};

struct ParsedCommand {
  bool help = false;               // --help or -h was given; nothing after it is parsed
  std::vector<std::string> set;    // C++ names of the flags the arguments set, in order
};

// Sets the flags of `specs` from `args`. Errors (kInvalidArgument, message naming the argument): an argument
// that is not a flag, a flag the command does not accept (or that does not exist), a missing value, a value
// the flag's type rejects, an int outside its range. The flags set before an error keep their new values.
absl::StatusOr<ParsedCommand> ParseCommandFlags(absl::Span<const std::string> args,
                                                absl::Span<const FlagSpec> specs);

// The command-line spelling of a flag's C++ name: "--" and dashes for underscores.
std::string FlagArg(const std::string& name);

// Usage lines generated from the flag definitions: for each spec, `--name=<default>` (a bool: `--name`),
// then its help text wrapped at 100 columns and indented.
std::string FlagsUsage(absl::Span<const FlagSpec> specs);

}  // namespace tools
}  // namespace kt

#endif  // KT_TOOLS_CLI_FLAGS_H_
