// The SFT reference backward against central finite differences of the reference forward: each VJP on its
// own, then every gradient of the whole layer (grad_input, grad_weights, all six LoRA grads).
//
// Tolerance: central differences with step eps have truncation error eps^2/6 |f'''| and rounding error
// ~ 2^-52 |f| / eps. With eps = 1e-5 and |f|, |f'''| = O(10) on these shapes both are below 1e-9, so
// |fd - analytic| <= 1e-7 (1 + |analytic|) leaves a wide margin yet catches any wrong term (a missing
// factor s or a wrong sign is O(1)).
#include "kt/sft/sft_reference.h"

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kt {
namespace {

constexpr double kEps = 1e-5;
constexpr double kTol = 1e-7;

std::vector<double> Random(size_t n, std::mt19937& rng, double scale = 1.0) {
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (double& x : v) x = d(rng);
  return v;
}

// Checks analytic[i] == d loss / d v[i] for every i by central differences.
void CheckGradient(const std::string& name, std::vector<double>& v, const std::vector<double>& analytic,
                   const std::function<double()>& loss) {
  ASSERT_EQ(v.size(), analytic.size()) << name;
  double worst = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    const double saved = v[i];
    v[i] = saved + kEps;
    const double lp = loss();
    v[i] = saved - kEps;
    const double lm = loss();
    v[i] = saved;
    const double fd = (lp - lm) / (2 * kEps);
    const double err = std::abs(fd - analytic[i]) / (1 + std::abs(analytic[i]));
    worst = std::max(worst, err);
    ASSERT_LE(err, kTol) << name << "[" << i << "]: finite difference " << fd << ", analytic "
                         << analytic[i];
  }
  // A gradient that is all zeros would pass trivially; every one checked here has nonzero entries.
  double norm = 0;
  for (double a : analytic) norm += a * a;
  EXPECT_GT(norm, 1e-6) << name << " is all zeros: the check proves nothing";
  std::printf("%-12s %zu entries, worst |fd - analytic| / (1 + |analytic|) = %.2e\n", name.c_str(),
              v.size(), worst);
}

double Dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

TEST(LoraLinearVjp, MatchesFiniteDifferences) {
  std::mt19937 rng(1);
  const int n = 7, kk = 9, r = 3;
  const double s = 2.0;
  std::vector<double> w = Random(n * kk, rng), a = Random(r * kk, rng), b = Random(n * r, rng),
                      x = Random(kk, rng), dy = Random(n, rng);
  auto loss = [&] {
    std::vector<double> y(n);
    LoraLinearRef(w.data(), a.data(), b.data(), n, kk, r, s, x.data(), y.data());
    return Dot(y, dy);
  };
  std::vector<double> dx(kk), da(r * kk, 0.0), db(n * r, 0.0);
  LoraLinearVjp(w.data(), a.data(), b.data(), n, kk, r, s, x.data(), dy.data(), dx.data(), da.data(),
                db.data());
  CheckGradient("dx", x, dx, loss);
  CheckGradient("dA", a, da, loss);
  CheckGradient("dB", b, db, loss);
}

TEST(LoraLinearVjp, AccumulatesIntoDaDb) {
  std::mt19937 rng(2);
  const int n = 4, kk = 5, r = 2;
  std::vector<double> w = Random(n * kk, rng), a = Random(r * kk, rng), b = Random(n * r, rng),
                      x = Random(kk, rng), dy = Random(n, rng);
  std::vector<double> dx(kk), da1(r * kk, 0.0), db1(n * r, 0.0), da2(r * kk, 0.0), db2(n * r, 0.0);
  LoraLinearVjp(w.data(), a.data(), b.data(), n, kk, r, 1.5, x.data(), dy.data(), dx.data(), da1.data(),
                db1.data());
  LoraLinearVjp(w.data(), a.data(), b.data(), n, kk, r, 1.5, x.data(), dy.data(), dx.data(), da2.data(),
                db2.data());
  LoraLinearVjp(w.data(), a.data(), b.data(), n, kk, r, 1.5, x.data(), dy.data(), dx.data(), da2.data(),
                db2.data());
  for (size_t i = 0; i < da1.size(); ++i) EXPECT_NEAR(da2[i], 2 * da1[i], 1e-12);
  for (size_t i = 0; i < db1.size(); ++i) EXPECT_NEAR(db2[i], 2 * db1[i], 1e-12);
}

TEST(SiluMulVjp, MatchesFiniteDifferences) {
  std::mt19937 rng(3);
  const int n = 11;
  // Spread g over [-12, 12]: both tails of the sigmoid and the steep middle.
  std::vector<double> g = Random(n, rng, 5.0), u = Random(n, rng), dh = Random(n, rng);
  auto loss = [&] {
    double l = 0;
    for (int i = 0; i < n; ++i) l += Silu(g[i]) * u[i] * dh[i];
    return l;
  };
  std::vector<double> dg(n), du(n);
  SiluMulVjp(g.data(), u.data(), dh.data(), n, dg.data(), du.data());
  CheckGradient("dg", g, dg, loss);
  CheckGradient("du", u, du, loss);
}

struct Problem {
  SftRefShape shape;
  SftRefParams p;
  SftRefBatch b;
  std::vector<double> grad_out;
};

Problem MakeProblem(int rank, uint32_t seed) {
  std::mt19937 rng(seed);
  Problem pr;
  pr.shape = SftRefShape{4, 6, 5, rank, rank ? 32.0 / 16.0 : 0.0};
  const size_t e = 4, h = 6, i = 5, r = rank;
  pr.p.gate = Random(e * i * h, rng, 0.5);
  pr.p.up = Random(e * i * h, rng, 0.5);
  pr.p.down = Random(e * h * i, rng, 0.5);
  pr.p.a_gate = Random(e * r * h, rng, 0.5);
  pr.p.b_gate = Random(e * i * r, rng, 0.5);
  pr.p.a_up = Random(e * r * h, rng, 0.5);
  pr.p.b_up = Random(e * i * r, rng, 0.5);
  pr.p.a_down = Random(e * r * i, rng, 0.5);
  pr.p.b_down = Random(e * h * r, rng, 0.5);
  pr.b.qlen = 5;
  pr.b.k = 2;
  // Token 1 picks expert 2 twice, token 3 has an invalid id, expert 3 gets no token at all.
  pr.b.ids = {0, 1, 2, 2, 1, -1, 0, 2, 1, 0};
  pr.b.weights = Random(10, rng);
  pr.b.input = Random(5 * h, rng);
  pr.grad_out = Random(5 * h, rng);
  return pr;
}

TEST(SftBackwardRef, EveryGradientMatchesFiniteDifferences) {
  Problem pr = MakeProblem(/*rank=*/2, 4);
  auto loss = [&] {
    std::vector<double> out;
    SftForwardRef(pr.shape, pr.p, pr.b, &out);
    return Dot(out, pr.grad_out);
  };
  SftRefGrads g;
  SftBackwardRef(pr.shape, pr.p, pr.b, pr.grad_out, &g);
  CheckGradient("grad_input", pr.b.input, g.input, loss);
  CheckGradient("grad_weights", pr.b.weights, g.weights, loss);
  CheckGradient("gate_lora_a", pr.p.a_gate, g.a_gate, loss);
  CheckGradient("gate_lora_b", pr.p.b_gate, g.b_gate, loss);
  CheckGradient("up_lora_a", pr.p.a_up, g.a_up, loss);
  CheckGradient("up_lora_b", pr.p.b_up, g.b_up, loss);
  CheckGradient("down_lora_a", pr.p.a_down, g.a_down, loss);
  CheckGradient("down_lora_b", pr.p.b_down, g.b_down, loss);
  // The invalid slot's router gradient and the unrouted expert's LoRA grads are exactly zero.
  EXPECT_EQ(g.weights[5], 0.0);
  const size_t h = 6, r = 2;
  for (size_t c = 0; c < r * h; ++c) EXPECT_EQ(g.a_gate[3 * r * h + c], 0.0);
}

TEST(SftBackwardRef, WithoutLoraMatchesFiniteDifferences) {
  Problem pr = MakeProblem(/*rank=*/0, 5);
  auto loss = [&] {
    std::vector<double> out;
    SftForwardRef(pr.shape, pr.p, pr.b, &out);
    return Dot(out, pr.grad_out);
  };
  SftRefGrads g;
  SftBackwardRef(pr.shape, pr.p, pr.b, pr.grad_out, &g);
  CheckGradient("grad_input", pr.b.input, g.input, loss);
  CheckGradient("grad_weights", pr.b.weights, g.weights, loss);
}

}  // namespace
}  // namespace kt
