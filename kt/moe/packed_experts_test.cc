// The packed expert storage (PackedExperts, through a MoeLayer's experts()) on every kernel path and format:
// the packed-to-packed transpose, the transposed read-back, and the low-level product kt/sft builds on.

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kt/moe/packed_experts.h"
#include "kt/moe/moe_layer_test_util.h"

namespace kt {
namespace moe_test {
namespace {

TEST_P(MoeLayerTest, LoadExpertTransposedEqualsLoadOfTranspose) {
  // bf16: the packed-to-packed transpose gives what LoadExpert of the transposed canonical weights gives
  // (read back through UnpackExpert); H = 40 is not a multiple of 16, so partial blocks are covered too.
  // Quantized formats: InvalidArgument, and nothing is marked loaded.
  const Layer l = Make(3, 2, 48, 40, 4, 21);
  ThreadPool pool(1);
  auto src = Build(l, pool);
  MoeConfig tc = l.config;
  std::swap(tc.hidden, tc.intermediate);
  absl::StatusOr<std::unique_ptr<MoeLayer>> t = MoeLayer::Create(tc, isa(), format());
  ASSERT_TRUE(t.ok()) << t.status();
  MoeLayer& m = **t;
  for (int slot = 0; slot < 3; ++slot) {
    for (ExpertProj proj : {ExpertProj::kGate, ExpertProj::kUp, ExpertProj::kDown}) {
      const absl::Status s = m.experts().LoadExpertTransposed(slot, proj, src->experts());
      if (format() != ExpertFormat::kBf16) {
        EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
        EXPECT_NE(s.message().find("format with a packed transpose"), absl::string_view::npos) << s;
        continue;
      }
      ASSERT_TRUE(s.ok()) << s;
    }
  }
  if (format() != ExpertFormat::kBf16) {
    EXPECT_EQ(m.FinishLoad().code(), absl::StatusCode::kFailedPrecondition);
    return;
  }
  ASSERT_TRUE(m.FinishLoad().ok());
  for (int slot = 0; slot < 3; ++slot) {
    for (ExpertProj proj : {ExpertProj::kGate, ExpertProj::kUp, ExpertProj::kDown}) {
      const size_t n = m.ProjRows(proj), k = m.ProjCols(proj);  // the source's [k, n]
      std::vector<bf16_t> w(n * k), wt(n * k);
      ASSERT_TRUE(src->experts().UnpackExpert(slot, proj, w.data()).ok());
      ASSERT_TRUE(m.experts().UnpackExpert(slot, proj, wt.data()).ok());
      for (size_t r = 0; r < n; ++r) {
        for (size_t c = 0; c < k; ++c) ASSERT_EQ(wt[r * k + c].bits, w[c * n + r].bits) << r << ", " << c;
      }
    }
  }
  // A layer of the same (untransposed) shape is not the source's transpose: the error says so.
  // (UnpackExpertTransposed, the int8 route, is checked in UnpackExpertTransposedIsTheTranspose.)
  absl::StatusOr<std::unique_ptr<MoeLayer>> same = MoeLayer::Create(l.config, isa(), format());
  ASSERT_TRUE(same.ok());
  const absl::Status s = (*same)->experts().LoadExpertTransposed(0, ExpertProj::kGate, src->experts());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("must be its transpose"), absl::string_view::npos) << s;
}

TEST_P(MoeLayerTest, UnpackExpertTransposedIsTheTranspose) {
  // Every format: the transposed unpack equals UnpackExpert transposed, bit for bit (N = 40 and K = 48 / 40
  // leave a partial panel).
  const Layer l = Make(3, 2, 48, 40, 4, 23);
  ThreadPool pool(1);
  auto m = Build(l, pool);
  for (int slot = 0; slot < 3; ++slot) {
    for (ExpertProj proj : {ExpertProj::kGate, ExpertProj::kUp, ExpertProj::kDown}) {
      const size_t n = m->ProjRows(proj), k = m->ProjCols(proj);
      std::vector<bf16_t> w(n * k), wt(n * k);
      const absl::Status s = m->experts().UnpackExpertTransposed(slot, proj, wt.data());
      ASSERT_TRUE(s.ok()) << s;
      ASSERT_TRUE(m->experts().UnpackExpert(slot, proj, w.data()).ok());
      for (size_t r = 0; r < n; ++r) {
        for (size_t c = 0; c < k; ++c) ASSERT_EQ(wt[c * n + r].bits, w[r * k + c].bits) << r << ", " << c;
      }
    }
  }
}

// The low-level access kt/sft builds on: UnpackExpert gives back the weights the format holds (bf16
// exactly; int8 as q * scale rounded to bf16, the same values Dequantize gives), and ProjectBlock on rows
// the caller prepared equals the double product of those rows and weights, for a column block that
// starts mid-matrix and ends on a remainder.
TEST_P(MoeLayerTest, ProjectBlockAndUnpackExpert) {
  ThreadPool pool(2);
  const Layer l = Make(3, 1, 72, 40, 4, 21);
  std::unique_ptr<MoeLayer> moe = Build(l, pool);
  const size_t n = l.config.hidden, k = l.config.intermediate;  // down: [H, I]
  std::vector<bf16_t> w(n * k);
  ASSERT_TRUE(moe->experts().UnpackExpert(2, ExpertProj::kDown, w.data()).ok());
  const bf16_t* src = l.down.data() + 2 * n * k;
  absl::StatusOr<QuantSpec> spec = moe->quant_spec();
  std::vector<float> deq(n * k);
  if (spec.ok()) {
    absl::StatusOr<QuantizedMatrix> q = Quantize(*spec, src, k, n, k);
    ASSERT_TRUE(q.ok());
    Dequantize(*q, deq.data(), k);
  } else {
    for (size_t i = 0; i < n * k; ++i) deq[i] = Bf16ToF32(src[i]);
  }
  for (size_t i = 0; i < n * k; ++i) ASSERT_EQ(w[i].bits, F32ToBf16(deq[i]).bits) << i;

  const size_t m = 5, c0 = 16, cols = n - c0;
  std::mt19937 rng(22);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<bf16_t> x(m * k);
  for (auto& v : x) v = F32ToBf16(d(rng));
  const size_t groups = moe->experts().ActivationGroups(ExpertProj::kDown);
  const size_t group_len = k / groups;
  std::vector<int8_t> qx(m * k);
  std::vector<float> sx(m * groups);
  std::vector<int32_t> sums(m * groups);
  ProjInput in;
  in.x = x.data();
  in.ld = k;
  std::vector<float> xs(m * k);  // the rows as the kernel sees them
  for (size_t i = 0; i < m * k; ++i) xs[i] = Bf16ToF32(x[i]);
  if (moe->experts().quantized_activations()) {
    for (size_t r = 0; r < m; ++r) {
      moe->experts().PrepareRow(ExpertProj::kDown, x.data() + r * k, qx.data() + r * k, sx.data() + r * groups,
                      sums.data() + r * groups);
      for (size_t c = 0; c < k; ++c) xs[r * k + c] = qx[r * k + c] * sx[r * groups + c / group_len];
    }
    in.qx = qx.data();
    in.sx = sx.data();
    in.xsum = sums.data();
  }
  std::vector<float> y(m * cols, -1.0f);
  moe->experts().ProjectBlock(ExpertProj::kDown, 2, c0, cols, in, m, y.data(), cols);
  for (size_t r = 0; r < m; ++r) {
    for (size_t j = 0; j < cols; ++j) {
      double want = 0, mag = 0;
      for (size_t c = 0; c < k; ++c) {
        want += static_cast<double>(xs[r * k + c]) * deq[(c0 + j) * k + c];
        mag += std::abs(static_cast<double>(xs[r * k + c]) * deq[(c0 + j) * k + c]);
      }
      // fp32 summation bound K 2^-23 sum|x w| (docs/TESTING.md), plus the int8 path's final fp32 scaling.
      ASSERT_NEAR(y[r * cols + j], want, k * std::ldexp(1.0, -23) * mag + 1e-6 * std::abs(want))
          << r << "," << j;
    }
  }
}

KT_INSTANTIATE_ALL_PATHS_AND_FORMATS(MoeLayerTest);

}  // namespace
}  // namespace moe_test
}  // namespace kt
