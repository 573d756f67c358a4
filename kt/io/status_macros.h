// Early-return helpers for functions of kt/io that return absl::Status or absl::StatusOr (Abseil ships none
// publicly). Each expands to plain code: no exceptions, no allocation beyond the expression's own.
#ifndef KT_IO_STATUS_MACROS_H_
#define KT_IO_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"

// Evaluates `expr` (an absl::Status) and returns it from the enclosing function if it is not OK.
#define KT_RETURN_IF_ERROR(expr)                          \
  do {                                                    \
    if (::absl::Status kt_status_ = (expr); !kt_status_.ok()) { \
      return kt_status_;                                  \
    }                                                     \
  } while (0)

// Evaluates `expr` (an absl::StatusOr<T>); returns its status if not OK, else moves its value into `lhs`
// (a declaration such as `auto x` or an existing variable).
#define KT_ASSIGN_OR_RETURN(lhs, expr) \
  KT_ASSIGN_OR_RETURN_IMPL_(KT_STATUS_CONCAT_(kt_status_or_, __LINE__), lhs, expr)
#define KT_STATUS_CONCAT_INNER_(a, b) a##b
#define KT_STATUS_CONCAT_(a, b) KT_STATUS_CONCAT_INNER_(a, b)
#define KT_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(*tmp)

#endif  // KT_IO_STATUS_MACROS_H_
