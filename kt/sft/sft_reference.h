// The slow, obvious truth of the SFT layer: forward with LoRA and its backward, in double (Eigen), on plain
// row-major arrays. Tests check the backward against central finite differences of the forward, and the
// engine (SftMoeLayer) against both.
//
// Math (PEFT orientation, s = lora_alpha / lora_rank), per token t, slot j, expert e = ids[t][j]:
//   g = W_g x + s B_g (A_g x),  u = W_u x + s B_u (A_u x)      W_g, W_u [I, H]; A [r, H]; B [I, r]
//   h = silu(g) * u                                            silu(g) = g sigma(g)
//   y = W_d h + s B_d (A_d h)                                  W_d [H, I]; A_d [r, I]; B_d [H, r]
//   out_t = sum_j w_tj y_tj
// An id < 0 or >= E contributes nothing (and gets grad_weights 0).
//
// The backward is written as one vector-Jacobian product per operation, each tested on its own:
//   LoraLinearVjp: y = W x + s B (A x)  ->  dx, dA, dB (given dy; W frozen)
//   SiluMulVjp:    h = silu(g) u        ->  dg, du
#ifndef KT_SFT_SFT_REFERENCE_H_
#define KT_SFT_SFT_REFERENCE_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kt {

struct SftRefShape {
  int num_experts = 0;  // E
  int hidden = 0;       // H
  int intermediate = 0; // I
  int rank = 0;         // r (0: no LoRA, the SkipLoRA case)
  double scale = 0;     // s = lora_alpha / lora_rank
};

// Everything the forward reads. Weights are [E, rows, cols] row-major.
struct SftRefParams {
  std::vector<double> gate, up, down;                 // [E,I,H], [E,I,H], [E,H,I]
  std::vector<double> a_gate, b_gate, a_up, b_up;     // [E,r,H], [E,I,r], [E,r,H], [E,I,r]
  std::vector<double> a_down, b_down;                 // [E,r,I], [E,H,r]
  // The frozen weights backward multiplies by (dx = W^T dy), same shapes as gate/up/down; empty: the
  // forward's. The engine's quantized bases hold a second, re-quantized copy for backward (FORMATS.md,
  // "SFT backward weights"), which tests model by putting its dequantized values here.
  std::vector<double> gate_bwd, up_bwd, down_bwd;
};

struct SftRefBatch {
  int qlen = 0, k = 0;
  std::vector<int64_t> ids;       // [qlen, k]
  std::vector<double> weights;    // [qlen, k]
  std::vector<double> input;      // [qlen, H]
};

// The gradients of <grad_out, out> with respect to every input of the forward (base weights excluded:
// they are frozen).
struct SftRefGrads {
  std::vector<double> input;                          // [qlen, H]
  std::vector<double> weights;                        // [qlen, k]
  std::vector<double> a_gate, b_gate, a_up, b_up;     // shapes of SftRefParams
  std::vector<double> a_down, b_down;
};

// y[n] = sum_k w[n][k] x[k] + s * sum_r b[n][r] (sum_k a[r][k] x[k]); w [n, kk], a [r, kk], b [n, r].
void LoraLinearRef(const double* w, const double* a, const double* b, int n, int kk, int r, double s,
                   const double* x, double* y);
// The VJP of LoraLinearRef for one x: dx[kk] = W^T dy + s A^T (B^T dy) (overwritten); dA[r,kk] += s (B^T dy) x^T;
// dB[n,r] += s dy (A x)^T.
void LoraLinearVjp(const double* w, const double* a, const double* b, int n, int kk, int r, double s,
                   const double* x, const double* dy, double* dx, double* da, double* db);

double Silu(double g);
// h = silu(g) u elementwise; VJP: dg = dh u silu'(g), du = dh silu(g).
void SiluMulVjp(const double* g, const double* u, const double* dh, int n, double* dg, double* du);

// out [qlen, H].
void SftForwardRef(const SftRefShape& shape, const SftRefParams& p, const SftRefBatch& b,
                   std::vector<double>* out);

// All gradients of sum(grad_out * out); recomputes the forward's intermediates itself.
void SftBackwardRef(const SftRefShape& shape, const SftRefParams& p, const SftRefBatch& b,
                    const std::vector<double>& grad_out, SftRefGrads* grads);

}  // namespace kt

#endif  // KT_SFT_SFT_REFERENCE_H_
