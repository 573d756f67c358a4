// What the CPU can run, and which kernel path kt will use. Detection is pure (CPUID/XGETBV plus the Linux
// AMX permission request); choosing a path from a user's request is a pure function so that the layer
// above, which owns configuration, decides where the request comes from (KT_ISA, an argument, a test).
#ifndef KT_KERNELS_CPU_FEATURES_H_
#define KT_KERNELS_CPU_FEATURES_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kt {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512cd = false;
  bool avx512_bf16 = false;
  bool avx512_vnni = false;
  bool avx512_vbmi = false;
  bool avx512_vbmi2 = false;
  bool avx512_bitalg = false;
  bool avx512_vpopcntdq = false;
  bool os_avx512 = false;  // XCR0 enables the ZMM and opmask state.
  bool amx_tile = false;
  bool amx_bf16 = false;
  bool amx_int8 = false;
  bool amx_permitted = false;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) succeeded.
  std::string brand;

  // One line for humans, e.g. "avx2 fma avx512f ... amx_tile(no permission)".
  std::string ToString() const;
};

// Reads CPUID once and, if the CPU reports AMX, asks Linux for permission to use tile data (needed once
// per process before the first tile instruction). Thread-safe; the result is cached.
const CpuFeatures& GetCpuFeatures();

// Kernel paths in increasing order of preference. Each path needs everything the previous ones need.
enum class Isa : int {
  kScalar = 0,      // Portable C++, the numerical reference.
  kAvx2 = 1,        // Highway HWY_AVX2 (AVX2 + FMA + F16C).
  kAvx512 = 2,      // Highway HWY_AVX3 (AVX-512 F/BW/DQ/VL).
  kAvx512Vnni = 3,  // Highway HWY_AVX3_DL (adds VNNI, VBMI, VBMI2, BITALG, VPOPCNTDQ).
  kAvx512Bf16 = 4,  // Native vdpbf16ps kernels (AVX512_BF16 on top of AVX3_DL).
  kAmx = 5,         // AMX tiles (BF16/INT8), with AVX512_BF16 for the rest.
};

// The KT_ISA spelling of each path: scalar, avx2, avx512, avx512_vnni, avx512_bf16, amx.
const char* IsaName(Isa isa);

// Parses a KT_ISA spelling ("avx3" and "avx3_dl" are accepted as aliases).
absl::StatusOr<Isa> ParseIsa(absl::string_view name);

// Whether `features` can run `isa`.
bool IsaSupported(Isa isa, const CpuFeatures& features);

// The best path `features` supports.
Isa BestIsa(const CpuFeatures& features);

// The path to use: the best supported one when `requested` is empty, else exactly `requested`. Asking for a
// path the CPU cannot run is an error naming what is missing, never a silent downgrade.
absl::StatusOr<Isa> ResolveIsa(absl::string_view requested, const CpuFeatures& features);

}  // namespace kt

#endif  // KT_KERNELS_CPU_FEATURES_H_
