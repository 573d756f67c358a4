// The kernel path the `kt` commands run: KT_ISA's choice (kt/kernels/cpu_features.h resolves it), and how it
// was made, for the reports.
#ifndef KT_TOOLS_ISA_CHOICE_H_
#define KT_TOOLS_ISA_CHOICE_H_

#include <cstdlib>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kt/kernels/cpu_features.h"

namespace kt {
namespace tools {

inline absl::StatusOr<Isa> SelectIsa() {
  const char* env = std::getenv("KT_ISA");
  return ResolveIsa(env == nullptr ? "" : env, GetCpuFeatures());
}

inline std::string IsaOrigin() {
  const char* env = std::getenv("KT_ISA");
  if (env == nullptr || env[0] == '\0') return "best supported; KT_ISA unset";
  return absl::StrCat("KT_ISA=", env);
}

}  // namespace tools
}  // namespace kt

#endif  // KT_TOOLS_ISA_CHOICE_H_
