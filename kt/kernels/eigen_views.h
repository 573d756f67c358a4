// Eigen views of kt's row-major buffers, for the double-precision references that the kernels are tested
// against (never for the kernels themselves). A view is an Eigen::Map: no copy, any row stride; bf16 and
// fp32 buffers are read through a widening expression, so a reference states its formula on doubles.
#ifndef KT_KERNELS_EIGEN_VIEWS_H_
#define KT_KERNELS_EIGEN_VIEWS_H_

#include <cstddef>
#include <cstdint>

#include "Eigen/Core"
#include "kt/kernels/dtype.h"

namespace kt {
namespace eigen {

template <typename T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixD = RowMatrix<double>;
using VectorD = Eigen::VectorXd;

// A rows x cols row-major matrix whose rows start ld elements apart.
template <typename T>
using ConstView = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <typename T>
using View = Eigen::Map<RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <typename T>
ConstView<T> MapRows(const T* p, size_t rows, size_t cols, size_t ld) {
  return ConstView<T>(p, static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols),
                      Eigen::OuterStride<>(static_cast<Eigen::Index>(ld)));
}
template <typename T>
View<T> MapRows(T* p, size_t rows, size_t cols, size_t ld) {
  return View<T>(p, static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols),
                 Eigen::OuterStride<>(static_cast<Eigen::Index>(ld)));
}
// Dense (ld = cols).
template <typename T>
ConstView<T> MapRows(const T* p, size_t rows, size_t cols) {
  return MapRows(p, rows, cols, cols);
}
template <typename T>
View<T> MapRows(T* p, size_t rows, size_t cols) {
  return MapRows(p, rows, cols, cols);
}

// A vector of n contiguous elements.
inline Eigen::Map<const VectorD> MapVector(const double* p, size_t n) {
  return Eigen::Map<const VectorD>(p, static_cast<Eigen::Index>(n));
}
inline Eigen::Map<VectorD> MapVector(double* p, size_t n) {
  return Eigen::Map<VectorD>(p, static_cast<Eigen::Index>(n));
}

// A rows x cols matrix whose element (i, j) is p[i * row_stride + j * col_stride] (col_stride = rows' ld
// and row_stride = 1 reads a stored matrix transposed).
template <typename T>
using ConstStridedView =
    Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;

template <typename T>
ConstStridedView<T> MapStrided(const T* p, size_t rows, size_t cols, size_t row_stride, size_t col_stride) {
  using Strides = Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>;
  return ConstStridedView<T>(p, static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols),
                             Strides(static_cast<Eigen::Index>(row_stride), static_cast<Eigen::Index>(col_stride)));
}

// The values of a bf16 matrix, exactly, in double (bf16 -> fp32 -> double are both exact).
inline MatrixD Bf16ToDouble(const bf16_t* p, size_t rows, size_t cols, size_t row_stride,
                            size_t col_stride = 1) {
  static_assert(sizeof(bf16_t) == sizeof(uint16_t), "bf16_t is its 16 bits");
  return MapStrided(reinterpret_cast<const uint16_t*>(p), rows, cols, row_stride, col_stride)
      .unaryExpr([](uint16_t bits) { return static_cast<double>(Bf16ToF32(bf16_t{bits})); });
}

// The same for fp32 (exact too).
inline MatrixD ToDouble(const float* p, size_t rows, size_t cols, size_t row_stride, size_t col_stride = 1) {
  return MapStrided(p, rows, cols, row_stride, col_stride).cast<double>();
}
inline MatrixD ToDouble(const bf16_t* p, size_t rows, size_t cols, size_t row_stride, size_t col_stride = 1) {
  return Bf16ToDouble(p, rows, cols, row_stride, col_stride);
}

}  // namespace eigen
}  // namespace kt

#endif  // KT_KERNELS_EIGEN_VIEWS_H_
