#include "kt/kernels/gemm_reference.h"

#include <vector>

#include "Eigen/Core"
#include "kt/kernels/eigen_views.h"

namespace kt {

using eigen::MapRows;
using eigen::MatrixD;

void GemmBf16Reference(size_t m, size_t n, size_t k, const bf16_t* x, size_t ldx, const bf16_t* w,
                       size_t ldw, float* y, size_t ldy) {
  const MatrixD xd = eigen::Bf16ToDouble(x, m, k, ldx);
  const MatrixD wd = eigen::Bf16ToDouble(w, n, k, ldw);
  MapRows(y, m, n, ldy) = (xd * wd.transpose()).cast<float>();
}

void GemmInt8Reference(size_t m, size_t n, size_t k, const int8_t* qx, size_t ldqx, const float* sx,
                       const int8_t* qw, size_t ldqw, const float* sw, float* y, size_t ldy) {
  const eigen::RowMatrix<int64_t> sums =
      MapRows(qx, m, k, ldqx).cast<int64_t>() * MapRows(qw, n, k, ldqw).cast<int64_t>().transpose();
  const MatrixD scales = MapRows(sx, m, 1).cast<double>() * MapRows(sw, 1, n).cast<double>();  // sx_i sw_j
  MapRows(y, m, n, ldy) = (scales.array() * sums.cast<double>().array()).cast<float>().matrix();
}

void GemmInt4Reference(size_t m, const int8_t* qx, size_t ldqx, const float* sx, const QuantizedMatrix& qm,
                       float* y, size_t ldy) {
  const size_t n = qm.n, k = qm.k;
  std::vector<float> deq(n * k);
  Dequantize(qm, deq.data(), k);
  const size_t groups = ScalesPerRow(qm.spec, k);
  const size_t len = IsGroupFormat(qm.spec.format) ? qm.spec.group_size : k;
  // The activations as the kernels see them: each int8 times its row's (and group's) scale, exact in double.
  MatrixD xd = MapRows(qx, m, k, ldqx).cast<double>();
  const auto scales = MapRows(sx, m, groups);
  for (size_t g = 0; g < groups; ++g) {
    xd.middleCols(g * len, len).array().colwise() *= scales.col(g).cast<double>().array();
  }
  MapRows(y, m, n, ldy) = (xd * MapRows(deq.data(), n, k).cast<double>().transpose()).cast<float>();
}

}  // namespace kt
