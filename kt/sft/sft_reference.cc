#include "kt/sft/sft_reference.h"

#include <cmath>

#include "Eigen/Core"
#include "kt/kernels/eigen_views.h"

namespace kt {
namespace {

using eigen::MapRows;
using eigen::MapVector;
using eigen::VectorD;

}  // namespace

void LoraLinearRef(const double* w, const double* a, const double* b, int n, int kk, int r, double s,
                   const double* x, double* y) {
  const auto W = MapRows(w, n, kk), A = MapRows(a, r, kk), B = MapRows(b, n, r);
  const auto xv = MapVector(x, kk);
  MapVector(y, n) = W * xv + s * (B * (A * xv));
}

void LoraLinearVjp(const double* w, const double* a, const double* b, int n, int kk, int r, double s,
                   const double* x, const double* dy, double* dx, double* da, double* db) {
  const auto W = MapRows(w, n, kk), A = MapRows(a, r, kk), B = MapRows(b, n, r);
  const auto xv = MapVector(x, kk), dyv = MapVector(dy, n);
  const VectorD bt_dy = B.transpose() * dyv;  // B^T dy [r]
  MapVector(dx, kk) = W.transpose() * dyv + s * (A.transpose() * bt_dy);
  MapRows(da, r, kk) += s * bt_dy * xv.transpose();
  MapRows(db, n, r) += s * dyv * (A * xv).transpose();
}

double Silu(double g) { return g / (1.0 + std::exp(-g)); }

void SiluMulVjp(const double* g, const double* u, const double* dh, int n, double* dg, double* du) {
  const auto gv = MapVector(g, n).array(), uv = MapVector(u, n).array(), dhv = MapVector(dh, n).array();
  const Eigen::ArrayXd sig = 1.0 / (1.0 + (-gv).exp());
  // d silu / dg = sigma + g sigma (1 - sigma)
  MapVector(dg, n) = (dhv * uv * sig * (1.0 + gv * (1.0 - sig))).matrix();
  MapVector(du, n) = (dhv * gv * sig).matrix();
}

namespace {

// Expert e's parameters as row-major arrays (LoRA ones null when r = 0: the products then have an inner
// dimension of 0 and read nothing).
struct ExpertView {
  const double *wg, *wu, *wd, *ag, *bg, *au, *bu, *ad, *bd;
};

ExpertView View(const SftRefShape& sh, const SftRefParams& p, int64_t e) {
  const size_t h = sh.hidden, i = sh.intermediate, r = sh.rank;
  ExpertView v;
  v.wg = p.gate.data() + e * i * h;
  v.wu = p.up.data() + e * i * h;
  v.wd = p.down.data() + e * h * i;
  v.ag = r ? p.a_gate.data() + e * r * h : nullptr;
  v.bg = r ? p.b_gate.data() + e * i * r : nullptr;
  v.au = r ? p.a_up.data() + e * r * h : nullptr;
  v.bu = r ? p.b_up.data() + e * i * r : nullptr;
  v.ad = r ? p.a_down.data() + e * r * i : nullptr;
  v.bd = r ? p.b_down.data() + e * h * r : nullptr;
  return v;
}

bool Valid(const SftRefShape& sh, int64_t e) { return e >= 0 && e < sh.num_experts; }

// One expert's forward on one token: g, u, h = silu(g) u and y.
struct ExpertForward {
  VectorD g, u, h, y;
};

ExpertForward Forward(const SftRefShape& sh, const ExpertView& v, const double* x) {
  const int hidden = sh.hidden, inter = sh.intermediate, r = sh.rank;
  ExpertForward f;
  f.g.resize(inter);
  f.u.resize(inter);
  f.y.resize(hidden);
  LoraLinearRef(v.wg, v.ag, v.bg, inter, hidden, r, sh.scale, x, f.g.data());
  LoraLinearRef(v.wu, v.au, v.bu, inter, hidden, r, sh.scale, x, f.u.data());
  f.h = (f.g.array() / (1.0 + (-f.g.array()).exp()) * f.u.array()).matrix();  // silu(g) u
  LoraLinearRef(v.wd, v.ad, v.bd, hidden, inter, r, sh.scale, f.h.data(), f.y.data());
  return f;
}

}  // namespace

void SftForwardRef(const SftRefShape& sh, const SftRefParams& p, const SftRefBatch& b,
                   std::vector<double>* out) {
  const int h = sh.hidden;
  out->assign(static_cast<size_t>(b.qlen) * h, 0.0);
  auto out_rows = MapRows(out->data(), b.qlen, h);
  for (int t = 0; t < b.qlen; ++t) {
    const double* x = b.input.data() + static_cast<size_t>(t) * h;
    for (int j = 0; j < b.k; ++j) {
      const int64_t e = b.ids[static_cast<size_t>(t) * b.k + j];
      if (!Valid(sh, e)) continue;
      // out_t = sum_j w_tj y_tj
      const double w = b.weights[static_cast<size_t>(t) * b.k + j];
      out_rows.row(t) += w * Forward(sh, View(sh, p, e), x).y.transpose();
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
  VectorD dh(inter), dg(inter), du(inter), dx_gate(h), dx_up(h);
  for (int t = 0; t < b.qlen; ++t) {
    const double* x = b.input.data() + static_cast<size_t>(t) * h;
    const auto go = MapVector(grad_out.data() + static_cast<size_t>(t) * h, h);
    for (int j = 0; j < b.k; ++j) {
      const size_t tj = static_cast<size_t>(t) * b.k + j;
      const int64_t e = b.ids[tj];
      if (!Valid(sh, e)) continue;
      const ExpertView v = View(sh, p, e);
      const ExpertForward f = Forward(sh, v, x);
      // out_t = sum_j w_tj y_tj: d/dw_tj = <go, y>, dy = w_tj go.
      gr->weights[tj] = go.dot(f.y);
      const VectorD dy = b.weights[tj] * go;
      const size_t ei = static_cast<size_t>(e);
      const double* wgb = p.gate_bwd.empty() ? v.wg : p.gate_bwd.data() + ei * inter * h;
      const double* wub = p.up_bwd.empty() ? v.wu : p.up_bwd.data() + ei * inter * h;
      const double* wdb = p.down_bwd.empty() ? v.wd : p.down_bwd.data() + ei * h * inter;
      LoraLinearVjp(wdb, v.ad, v.bd, h, inter, r, sh.scale, f.h.data(), dy.data(), dh.data(),
                    gr->a_down.data() + ei * r * inter, gr->b_down.data() + ei * h * r);
      SiluMulVjp(f.g.data(), f.u.data(), dh.data(), inter, dg.data(), du.data());
      LoraLinearVjp(wgb, v.ag, v.bg, inter, h, r, sh.scale, x, dg.data(), dx_gate.data(),
                    gr->a_gate.data() + ei * r * h, gr->b_gate.data() + ei * inter * r);
      LoraLinearVjp(wub, v.au, v.bu, inter, h, r, sh.scale, x, du.data(), dx_up.data(),
                    gr->a_up.data() + ei * r * h, gr->b_up.data() + ei * inter * r);
      // dx = W_g^T dg + W_u^T du + the LoRA terms
      MapVector(gr->input.data() + static_cast<size_t>(t) * h, h) += dx_gate + dx_up;
    }
  }
}

}  // namespace kt
