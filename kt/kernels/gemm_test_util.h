// What the GEMM kernel tests (gemm_{bf16,int8,int4}_test.cc) share: the kernel paths they are
// parameterised over (read from each family's table) and the fixture that skips a path this CPU lacks, the guarded output buffer that
// catches writes outside the m x n block, the shape sets, and the end-to-end error against the exact
// product of the bf16 inputs. The references and tolerances stay in each test.
#ifndef KT_KERNELS_GEMM_TEST_UTIL_H_
#define KT_KERNELS_GEMM_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/eigen_views.h"
#include "kt/kernels/gemm_path.h"
#include "kt/kernels/hwy_dispatch.h"

namespace kt {
namespace gemm_test {

// One kernel under test: its name (the test's suffix), the Isa its CPU needs, and how to get it (called in
// SetUp, after the CPU check).
template <typename Fn>
struct KernelPath {
  std::string name;
  Isa isa;
  std::function<Fn()> get;
};

template <typename Fn>
void PrintTo(const KernelPath<Fn>& path, std::ostream* os) {
  *os << path.name;
}

// The paths of a family's table (GemmBf16Paths(), GemmInt8Paths(), GemmInt4Paths()): every kernel the
// family has, each tested under its table name.
template <typename Fn>
std::vector<KernelPath<Fn>> TablePaths(const GemmPaths<Fn>& table) {
  std::vector<KernelPath<Fn>> paths;
  for (const GemmPath<Fn>& path : table) {
    const Fn fn = path.fn;
    paths.push_back({path.name, path.isa, [fn] { return fn; }});
  }
  return paths;
}

// The family's table lists exactly `names` (so a Highway target that was not compiled in shows), and
// get(isa) (GetGemmBf16, ...) returns the kernel of the path `selected[isa]` names, for every Isa.
template <typename Fn>
void ExpectTableSelects(const GemmPaths<Fn>& table, Fn (*get)(Isa), const std::vector<std::string>& names,
                        const std::vector<std::string>& selected) {
  if (!kAllHwyTargets) {
    GTEST_SKIP() << "this build leaves Highway targets out (HWY_DISABLED_TARGETS), so the table differs";
  }
  std::vector<std::string> listed;
  for (const GemmPath<Fn>& path : table) listed.push_back(path.name);
  EXPECT_EQ(listed, names);
  ASSERT_EQ(selected.size(), static_cast<size_t>(Isa::kAmx) + 1);
  for (size_t i = 0; i < selected.size(); ++i) {
    const Isa isa = static_cast<Isa>(i);
    Fn want = nullptr;
    for (const GemmPath<Fn>& path : table) {
      if (selected[i] == path.name) want = path.fn;
    }
    EXPECT_NE(want, nullptr) << selected[i] << " is not in the table";
    EXPECT_EQ(get(isa), want) << IsaName(isa) << " should select " << selected[i];
  }
}

// A test over kernel paths: skips a path whose Isa this CPU lacks, else sets fn_ (never null).
template <typename Fn>
class KernelPathTest : public ::testing::TestWithParam<KernelPath<Fn>> {
 protected:
  void SetUp() override {
    const KernelPath<Fn>& path = this->GetParam();
    if (!IsaSupported(path.isa, GetCpuFeatures())) {
      GTEST_SKIP() << path.name << " needs " << IsaName(path.isa) << ", not supported by this CPU ("
                   << GetCpuFeatures().ToString() << "); it is tested on a machine that has it.";
    }
    fn_ = path.get();
    ASSERT_NE(fn_, nullptr);
  }

  Fn fn_ = nullptr;
};

// The test name suffix of a path (for INSTANTIATE_TEST_SUITE_P).
struct PathName {
  template <typename Fn>
  std::string operator()(const ::testing::TestParamInfo<KernelPath<Fn>>& info) const {
    return info.param.name;
  }
};

// A kernel's fp32 output: m rows ld() = n + 5 apart, one float into a buffer that holds a sentinel before
// the first row and in the ld() - n columns after each row (those belong to the caller), so y is
// misaligned and a write outside the m x n block shows.
class GuardedOutput {
 public:
  GuardedOutput(size_t m, size_t n) : n_(n), ldy_(n + 5), buf_(m * ldy_ + 1, kSentinel) {}

  float* data() { return buf_.data() + 1; }
  size_t ld() const { return ldy_; }
  float at(size_t i, size_t j) const { return buf_[1 + i * ldy_ + j]; }

  // Row i's columns between n and ld(), and the float before y, still hold the sentinel.
  void ExpectRowPaddingUntouched(size_t i) const {
    for (size_t j = n_; j < ldy_ && 1 + i * ldy_ + j < buf_.size(); ++j) {
      EXPECT_EQ(buf_[1 + i * ldy_ + j], kSentinel) << "wrote past n_cols at row " << i;
    }
  }
  void ExpectNothingBefore() const { EXPECT_EQ(buf_[0], kSentinel) << "wrote before y"; }

 private:
  static constexpr float kSentinel = 12345.0f;
  size_t n_, ldy_;
  std::vector<float> buf_;
};

// check(m, n, k, x_offset) for M = 1..33 (row blocks of 8 and 4, AMX's 16/32-row tiles, tails), every n of
// `ns` and k of `ks`, x_offset = m % 2 (a misaligned x); stops at the first failure. Returns the largest
// value check returned.
template <typename Check>
double SweepShapes(const std::vector<size_t>& ns, const std::vector<size_t>& ks, Check check) {
  double worst = 0;
  for (size_t m = 1; m <= 33; ++m) {
    for (size_t n : ns) {
      for (size_t k : ks) {
        worst = std::max(worst, check(m, n, k, /*x_offset=*/m % 2));
        if (::testing::Test::HasFailure()) return worst;
      }
    }
  }
  return worst;
}

// check(m, n, k, x_offset) on realistic expert projections (gate/up: N=I, K=H; down: N=H, K=I) at decode
// and prefill row counts (8..64 rows cover AMX's one and two 16-row tiles with and without a remainder),
// then K spanning several AMX K blocks plus a tail, with whole and edge blocks and a column count past one
// 8-panel group.
template <typename Check>
void ForExpertShapes(Check check) {
  for (size_t m : {1, 4, 8, 16, 37, 64}) {
    check(m, 96, 256, 1);
    check(m, 256, 96, 0);
  }
  check(64, 160, 600, 0);
  check(45, 150, 547, 1);
}

// The AMX kernels' K-blocked schedule: for K blocks of 0 (unblocked), 1, 3, 8 and 32 tile rows, which need
// not divide K, set_kb(kb) and check(m, n, k, x_offset) with more rows than a row group (256) and row and
// column remainders that fall back to whole-K blocks; stops after the first block that fails. `tile_k` is
// the K of one 64-byte tile row: 32 for bf16, 64 for int8.
template <typename SetKb, typename Check>
void ForAmxKBlockShapes(size_t tile_k, SetKb set_kb, Check check) {
  for (size_t kb : {0, 1, 3, 8, 32}) {
    set_kb(kb * tile_k);
    check(64, 64, 20 * tile_k, 0);
    check(100, 100, 10 * tile_k, 1);
    check(300, 32, 8 * tile_k, 0);
    check(33, 160, 3 * tile_k, 1);
    if (::testing::Test::HasFailure()) return;
  }
}

// mean |y - exact| / mean |exact| of an m x n output y (row stride n) against the exact (double) product
// of the bf16 x (m x k) and w (n x k) it was computed from.
inline double MeanRelErrorVsBf16Product(size_t m, size_t n, size_t k, const std::vector<bf16_t>& x,
                                        const std::vector<bf16_t>& w, const std::vector<float>& y) {
  const eigen::MatrixD exact =
      eigen::Bf16ToDouble(x.data(), m, k, k) * eigen::Bf16ToDouble(w.data(), n, k, k).transpose();
  return (eigen::MapRows(y.data(), m, n).cast<double>() - exact).cwiseAbs().sum() / exact.cwiseAbs().sum();
}

}  // namespace gemm_test
}  // namespace kt

#endif  // KT_KERNELS_GEMM_TEST_UTIL_H_
