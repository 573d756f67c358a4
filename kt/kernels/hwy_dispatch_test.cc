// The Isa -> Highway target mapping every Highway module of kt shares, and the fallback of a build that
// compiled fewer targets.
#include "kt/kernels/hwy_dispatch.h"

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"

namespace kt {
namespace {

// kt builds its Highway modules with HWY_WANT_AVX3_DL (HWY_COPTS), so all three x86 targets are compiled;
// a KT_ISA path would otherwise quietly run narrower code.
// (Unless a build leaves targets out on purpose: kAllHwyTargets.)
static_assert(!kAllHwyTargets ||
                  ((HWY_TARGETS & HWY_AVX2) && (HWY_TARGETS & HWY_AVX3) && (HWY_TARGETS & HWY_AVX3_DL)),
              "kt/kernels' HWY_COPTS must compile AVX2, AVX3 and AVX3_DL");

using Fn = int (*)();
int Avx2() { return 2; }
int Avx3() { return 3; }
int Avx3Dl() { return 4; }

TEST(HwyDispatch, EachIsaHasOneTarget) {
  EXPECT_EQ(HwyTargetOf(Isa::kScalar), HwyTarget::kNone);
  EXPECT_EQ(HwyTargetOf(Isa::kAvx2), HwyTarget::kAvx2);
  EXPECT_EQ(HwyTargetOf(Isa::kAvx512), HwyTarget::kAvx3);
  // The native paths have kernels of their own only for the GEMMs; everything else runs AVX3_DL code.
  EXPECT_EQ(HwyTargetOf(Isa::kAvx512Vnni), HwyTarget::kAvx3Dl);
  EXPECT_EQ(HwyTargetOf(Isa::kAvx512Bf16), HwyTarget::kAvx3Dl);
  EXPECT_EQ(HwyTargetOf(Isa::kAmx), HwyTarget::kAvx3Dl);
  EXPECT_STREQ(HwyTargetName(HwyTargetOf(Isa::kAvx512)), "avx3");
}

TEST(HwyDispatch, TablePicksTheTargetOfTheIsa) {
  constexpr HwyFns<Fn> fns{&Avx2, &Avx3, &Avx3Dl};
  EXPECT_EQ(fns.For(Isa::kScalar), nullptr);
  EXPECT_EQ(fns.For(Isa::kAvx2), &Avx2);
  EXPECT_EQ(fns.For(Isa::kAvx512), &Avx3);
  for (Isa isa : {Isa::kAvx512Vnni, Isa::kAvx512Bf16, Isa::kAmx}) EXPECT_EQ(fns.For(isa), &Avx3Dl);
  EXPECT_EQ(fns.At(HwyTarget::kNone), nullptr);
  EXPECT_EQ(fns.At(HwyTarget::kAvx3), &Avx3);
}

TEST(HwyDispatch, MissingTargetFallsToTheNextLowerOne) {
  constexpr HwyFns<Fn> only_avx2{&Avx2, nullptr, nullptr};
  EXPECT_EQ(only_avx2.For(Isa::kAvx512), &Avx2);
  EXPECT_EQ(only_avx2.For(Isa::kAmx), &Avx2);
  constexpr HwyFns<Fn> no_dl{&Avx2, &Avx3, nullptr};
  EXPECT_EQ(no_dl.For(Isa::kAvx512Vnni), &Avx3);
  constexpr HwyFns<Fn> none{};
  EXPECT_EQ(none.For(Isa::kAvx2), nullptr);
}

}  // namespace
}  // namespace kt
