// The weight-format table: every ExpertFormat has one consistent entry, names round-trip, QuantSpecOf and
// the activation helpers follow the traits, and each format's packed layout addresses whole panels.
#include "kt/moe/expert_format.h"

#include <string>

#include "gtest/gtest.h"

namespace kt {
namespace {

constexpr ExpertFormat kAll[] = {ExpertFormat::kBf16,         ExpertFormat::kInt8,
                                 ExpertFormat::kInt4,         ExpertFormat::kInt4GroupSym,
                                 ExpertFormat::kInt4GroupAsym, ExpertFormat::kInt4Asym,
                                 ExpertFormat::kFp8Block,     ExpertFormat::kMxfp4,
                                 ExpertFormat::kMxfp8};

TEST(ExpertFormatTest, EveryFormatHasAConsistentEntry) {
  for (ExpertFormat f : kAll) {
    const ExpertFormatTraits& t = FormatTraits(f);
    SCOPED_TRACE(t.name);
    EXPECT_EQ(t.format, f);
    EXPECT_EQ(std::string(ExpertFormatName(f)), t.name);
    absl::StatusOr<ExpertFormat> parsed = ParseExpertFormat(t.name);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, f);
    ASSERT_NE(t.layout, nullptr);
    ASSERT_NE(t.bind_gemm, nullptr);
    ASSERT_NE(t.unpack, nullptr);
    // Exactly one way in from bf16: packed directly (unquantized) or quantized then packed.
    EXPECT_EQ(t.pack_bf16 != nullptr, !t.quantized);
    EXPECT_EQ(t.pack_quantized != nullptr, t.quantized);
    // Only quantized formats prepare int8 rows (fp8_block, quantized, reads bf16 rows); only grouped ones
    // per group.
    if (!t.quantized) {
      EXPECT_EQ(t.activation, ActivationKind::kBf16Rows);
    }
    EXPECT_EQ(t.activation == ActivationKind::kInt8PerGroup, t.grouped);
    EXPECT_EQ(ActivationBytes(t), t.activation == ActivationKind::kBf16Rows ? 2u : 1u);
    EXPECT_EQ(ActivationGroupsOf(t, 256, 64), t.grouped ? 4u : 1u);
    // Every path has a scalar kernel.
    FormatGemm g;
    EXPECT_TRUE(t.bind_gemm(Isa::kScalar, 0, &g));
    EXPECT_NE(g.run, nullptr);
    EXPECT_NE(g.kernel, nullptr);
    // Column blocks start at whole panels: 16 rows per panel, so N = 40 has 3 panels.
    const PackedLayout l = t.layout(40, 64, 32);
    EXPECT_GT(l.panel_bytes, 0u);
    EXPECT_EQ(l.expert_bytes, 3 * l.panel_bytes);
    // fp32 scales, except the MX formats, whose E8M0 scale codes are bytes in the uint8 array.
    const bool mx = t.quantized && IsMxFormat(t.quant_format);
    EXPECT_EQ(l.scale_entries > 0, t.quantized && !mx);
    EXPECT_EQ(l.zero_entries > 0, (IsAsymFormat(t.quant_format) && t.quantized) || mx);
  }
}

TEST(ExpertFormatTest, QuantSpecOfFollowsTheTable) {
  EXPECT_EQ(QuantSpecOf(ExpertFormat::kBf16).status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<QuantSpec> s = QuantSpecOf(ExpertFormat::kInt4GroupAsym, 64);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->format, QuantFormat::kInt4GroupAsym);
  EXPECT_EQ(s->group_size, 64);
  s = QuantSpecOf(ExpertFormat::kInt8, 64);  // per channel: group_size ignored
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->group_size, 0);
  s = QuantSpecOf(ExpertFormat::kInt4GroupSym, 48);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("expected 32, 64 or 128"), absl::string_view::npos) << s.status();
  EXPECT_EQ(ParseExpertFormat("fp8").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kt
