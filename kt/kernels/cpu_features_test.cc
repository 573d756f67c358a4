#include "kt/kernels/cpu_features.h"

#include "gtest/gtest.h"

namespace kt {
namespace {

TEST(CpuFeatures, DetectsSomethingConsistent) {
  const CpuFeatures& f = GetCpuFeatures();
  // Implications that hold on every real CPU; a detection bug usually breaks one of them.
  if (f.avx512bw) {
    EXPECT_TRUE(f.avx512f);
  }
  if (f.avx512f) {
    EXPECT_TRUE(f.avx2);
  }
  if (f.amx_permitted) {
    EXPECT_TRUE(f.amx_tile);
  }
  EXPECT_FALSE(f.ToString().empty() && f.avx2);
  // Every x86-64 machine kt targets has AVX2. Nothing beyond it is asserted: CI's Debian 12 VMs differ in
  // CPU from run to run (an AMD EPYC with AVX2 only and an AMD Zen 5 with AVX-512 BF16/VNNI have both been
  // seen), and the AVX-512 and AMX paths are tested on whatever machine has them.
  EXPECT_TRUE(f.avx2) << f.ToString();
}

TEST(Isa, NamesRoundTrip) {
  for (int i = 0; i <= static_cast<int>(Isa::kAmx); ++i) {
    const Isa isa = static_cast<Isa>(i);
    absl::StatusOr<Isa> parsed = ParseIsa(IsaName(isa));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, isa);
  }
  EXPECT_EQ(*ParseIsa("AVX3"), Isa::kAvx512);
  EXPECT_EQ(*ParseIsa(" avx3_dl "), Isa::kAvx512Vnni);
}

TEST(Isa, UnknownNameIsAnErrorListingChoices) {
  absl::StatusOr<Isa> r = ResolveIsa("avx9000", GetCpuFeatures());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("avx9000"), absl::string_view::npos);
  EXPECT_NE(r.status().message().find("avx512_bf16"), absl::string_view::npos);
}

TEST(Isa, UnsupportedRequestIsAnErrorNotADowngrade) {
  CpuFeatures avx2_only;
  avx2_only.avx2 = avx2_only.fma = true;
  EXPECT_EQ(BestIsa(avx2_only), Isa::kAvx2);
  absl::StatusOr<Isa> r = ResolveIsa("avx512_bf16", avx2_only);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("avx512f"), absl::string_view::npos) << r.status();
  EXPECT_NE(r.status().message().find("avx512_bf16"), absl::string_view::npos) << r.status();
  EXPECT_EQ(*ResolveIsa("scalar", avx2_only), Isa::kScalar);
  EXPECT_EQ(*ResolveIsa("", avx2_only), Isa::kAvx2);
}

TEST(Isa, AmxIsBestWhenPermitted) {
  CpuFeatures all;
  all.avx2 = all.fma = all.avx512f = all.avx512bw = all.avx512dq = all.avx512vl = true;
  all.avx512_vnni = all.avx512_vbmi = all.avx512_vbmi2 = all.avx512_bitalg = true;
  all.avx512_vpopcntdq = all.avx512_bf16 = true;
  all.amx_tile = all.amx_bf16 = all.amx_int8 = all.amx_permitted = true;
  EXPECT_TRUE(IsaSupported(Isa::kAmx, all));
  EXPECT_EQ(BestIsa(all), Isa::kAmx);
  EXPECT_EQ(*ResolveIsa("amx", all), Isa::kAmx);
  EXPECT_EQ(*ResolveIsa("avx512_bf16", all), Isa::kAvx512Bf16);
}

TEST(Isa, AmxWithoutPermissionIsNotSupported) {
  CpuFeatures f;
  f.avx2 = f.fma = f.avx512f = f.avx512bw = f.avx512dq = f.avx512vl = true;
  f.avx512_vnni = f.avx512_vbmi = f.avx512_vbmi2 = f.avx512_bitalg = f.avx512_vpopcntdq = true;
  f.avx512_bf16 = f.amx_tile = f.amx_bf16 = f.amx_int8 = true;
  f.amx_permitted = false;
  EXPECT_FALSE(IsaSupported(Isa::kAmx, f));
}

}  // namespace
}  // namespace kt
