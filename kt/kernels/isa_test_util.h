// What the per-path tests of the Highway modules (act_quant, activation, convert, quant_fast, lora_kernels)
// share: every Isa as a test parameter, named by its KT_ISA spelling. Each test skips a path this CPU lacks.
#ifndef KT_KERNELS_ISA_TEST_UTIL_H_
#define KT_KERNELS_ISA_TEST_UTIL_H_

#include <string>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"

namespace kt {
namespace isa_test {

// Every path, scalar to amx: INSTANTIATE_TEST_SUITE_P(AllPaths, FooTest, isa_test::AllIsas(),
// isa_test::IsaParamName()).
inline auto AllIsas() {
  return ::testing::Values(Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Vnni, Isa::kAvx512Bf16,
                           Isa::kAmx);
}

// The test name suffix of a path: "avx2", "avx512_vnni", ...
struct IsaParamName {
  std::string operator()(const ::testing::TestParamInfo<Isa>& info) const { return IsaName(info.param); }
};

}  // namespace isa_test
}  // namespace kt

#endif  // KT_KERNELS_ISA_TEST_UTIL_H_
