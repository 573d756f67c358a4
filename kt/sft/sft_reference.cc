#include "kt/sft/sft_reference.h"

#include <cmath>

namespace kt {

void LoraLinearRef(const double* w, const double* a, const double* b, int n, int kk, int r, double s,
                   const double* x, double* y) {
  std::vector<double> ax(r, 0.0);
  for (int i = 0; i < r; ++i) {
    for (int c = 0; c < kk; ++c) ax[i] += a[static_cast<size_t>(i) * kk + c] * x[c];
  }
  for (int o = 0; o < n; ++o) {
    double acc = 0;
    for (int c = 0; c < kk; ++c) acc += w[static_cast<size_t>(o) * kk + c] * x[c];
    double lora = 0;
    for (int i = 0; i < r; ++i) lora += b[static_cast<size_t>(o) * r + i] * ax[i];
    y[o] = acc + s * lora;
  }
}

void LoraLinearVjp(const double* w, const double* a, const double* b, int n, int kk, int r, double s,
                   const double* x, const double* dy, double* dx, double* da, double* db) {
  std::vector<double> ax(r, 0.0), btdy(r, 0.0);
  for (int i = 0; i < r; ++i) {
    for (int c = 0; c < kk; ++c) ax[i] += a[static_cast<size_t>(i) * kk + c] * x[c];
    for (int o = 0; o < n; ++o) btdy[i] += b[static_cast<size_t>(o) * r + i] * dy[o];
  }
  for (int c = 0; c < kk; ++c) {
    double acc = 0;
    for (int o = 0; o < n; ++o) acc += w[static_cast<size_t>(o) * kk + c] * dy[o];
    for (int i = 0; i < r; ++i) acc += s * a[static_cast<size_t>(i) * kk + c] * btdy[i];
    dx[c] = acc;
  }
  for (int i = 0; i < r; ++i) {
    for (int c = 0; c < kk; ++c) da[static_cast<size_t>(i) * kk + c] += s * btdy[i] * x[c];
  }
  for (int o = 0; o < n; ++o) {
    for (int i = 0; i < r; ++i) db[static_cast<size_t>(o) * r + i] += s * dy[o] * ax[i];
  }
}

double Silu(double g) { return g / (1.0 + std::exp(-g)); }

void SiluMulVjp(const double* g, const double* u, const double* dh, int n, double* dg, double* du) {
  for (int i = 0; i < n; ++i) {
    const double sig = 1.0 / (1.0 + std::exp(-g[i]));
    // d silu / dg = sigma + g sigma (1 - sigma)
    dg[i] = dh[i] * u[i] * sig * (1.0 + g[i] * (1.0 - sig));
    du[i] = dh[i] * g[i] * sig;
  }
}

namespace {

struct ExpertView {
  const double *wg, *wu, *wd, *ag, *bg, *au, *bu, *ad, *bd;
};

ExpertView View(const SftRefShape& sh, const SftRefParams& p, int64_t e) {
  const size_t h = sh.hidden, i = sh.intermediate, r = sh.rank;
  ExpertView v;
  v.wg = p.gate.data() + e * i * h;
  v.wu = p.up.data() + e * i * h;
  v.wd = p.down.data() + e * h * i;
  // With r = 0 the LoRA arrays may be empty; the loops never read them.
  v.ag = r ? p.a_gate.data() + e * r * h : nullptr;
  v.bg = r ? p.b_gate.data() + e * i * r : nullptr;
  v.au = r ? p.a_up.data() + e * r * h : nullptr;
  v.bu = r ? p.b_up.data() + e * i * r : nullptr;
  v.ad = r ? p.a_down.data() + e * r * i : nullptr;
  v.bd = r ? p.b_down.data() + e * h * r : nullptr;
  return v;
}

bool Valid(const SftRefShape& sh, int64_t e) { return e >= 0 && e < sh.num_experts; }

}  // namespace

void SftForwardRef(const SftRefShape& sh, const SftRefParams& p, const SftRefBatch& b,
                   std::vector<double>* out) {
  const int h = sh.hidden, inter = sh.intermediate, r = sh.rank;
  out->assign(static_cast<size_t>(b.qlen) * h, 0.0);
  std::vector<double> g(inter), u(inter), hh(inter), y(h);
  for (int t = 0; t < b.qlen; ++t) {
    const double* x = b.input.data() + static_cast<size_t>(t) * h;
    for (int j = 0; j < b.k; ++j) {
      const int64_t e = b.ids[static_cast<size_t>(t) * b.k + j];
      if (!Valid(sh, e)) continue;
      const ExpertView v = View(sh, p, e);
      LoraLinearRef(v.wg, v.ag, v.bg, inter, h, r, sh.scale, x, g.data());
      LoraLinearRef(v.wu, v.au, v.bu, inter, h, r, sh.scale, x, u.data());
      for (int c = 0; c < inter; ++c) hh[c] = Silu(g[c]) * u[c];
      LoraLinearRef(v.wd, v.ad, v.bd, h, inter, r, sh.scale, hh.data(), y.data());
      const double w = b.weights[static_cast<size_t>(t) * b.k + j];
      for (int c = 0; c < h; ++c) (*out)[static_cast<size_t>(t) * h + c] += w * y[c];
    }
  }
}

void SftBackwardRef(const SftRefShape& sh, const SftRefParams& p, const SftRefBatch& b,
                    const std::vector<double>& grad_out, SftRefGrads* gr) {
  const int h = sh.hidden, inter = sh.intermediate, r = sh.rank;
  const size_t e_count = sh.num_experts;
  gr->input.assign(static_cast<size_t>(b.qlen) * h, 0.0);
  gr->weights.assign(static_cast<size_t>(b.qlen) * b.k, 0.0);
  gr->a_gate.assign(e_count * r * h, 0.0);
  gr->b_gate.assign(e_count * inter * r, 0.0);
  gr->a_up.assign(e_count * r * h, 0.0);
  gr->b_up.assign(e_count * inter * r, 0.0);
  gr->a_down.assign(e_count * r * inter, 0.0);
  gr->b_down.assign(e_count * h * r, 0.0);
  std::vector<double> g(inter), u(inter), hh(inter), y(h), dy(h), dh(inter), dg(inter), du(inter),
      dx(h);
  for (int t = 0; t < b.qlen; ++t) {
    const double* x = b.input.data() + static_cast<size_t>(t) * h;
    const double* go = grad_out.data() + static_cast<size_t>(t) * h;
    for (int j = 0; j < b.k; ++j) {
      const size_t tj = static_cast<size_t>(t) * b.k + j;
      const int64_t e = b.ids[tj];
      if (!Valid(sh, e)) continue;
      const ExpertView v = View(sh, p, e);
      LoraLinearRef(v.wg, v.ag, v.bg, inter, h, r, sh.scale, x, g.data());
      LoraLinearRef(v.wu, v.au, v.bu, inter, h, r, sh.scale, x, u.data());
      for (int c = 0; c < inter; ++c) hh[c] = Silu(g[c]) * u[c];
      LoraLinearRef(v.wd, v.ad, v.bd, h, inter, r, sh.scale, hh.data(), y.data());
      // out_t = sum_j w_tj y_tj: d/dw_tj = <go, y>, dy = w_tj go.
      double dw = 0;
      for (int c = 0; c < h; ++c) {
        dw += go[c] * y[c];
        dy[c] = b.weights[tj] * go[c];
      }
      gr->weights[tj] = dw;
      const size_t ei = static_cast<size_t>(e);
      const double* wgb = p.gate_bwd.empty() ? v.wg : p.gate_bwd.data() + ei * inter * h;
      const double* wub = p.up_bwd.empty() ? v.wu : p.up_bwd.data() + ei * inter * h;
      const double* wdb = p.down_bwd.empty() ? v.wd : p.down_bwd.data() + ei * h * inter;
      LoraLinearVjp(wdb, v.ad, v.bd, h, inter, r, sh.scale, hh.data(), dy.data(), dh.data(),
                    gr->a_down.data() + ei * r * inter, gr->b_down.data() + ei * h * r);
      SiluMulVjp(g.data(), u.data(), dh.data(), inter, dg.data(), du.data());
      LoraLinearVjp(wgb, v.ag, v.bg, inter, h, r, sh.scale, x, dg.data(), dx.data(),
                    gr->a_gate.data() + ei * r * h, gr->b_gate.data() + ei * inter * r);
      for (int c = 0; c < h; ++c) gr->input[static_cast<size_t>(t) * h + c] += dx[c];
      LoraLinearVjp(wub, v.au, v.bu, inter, h, r, sh.scale, x, du.data(), dx.data(),
                    gr->a_up.data() + ei * r * h, gr->b_up.data() + ei * inter * r);
      for (int c = 0; c < h; ++c) gr->input[static_cast<size_t>(t) * h + c] += dx[c];
    }
  }
}

}  // namespace kt
