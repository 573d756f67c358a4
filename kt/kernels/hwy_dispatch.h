// The one place where kt's Isa becomes a Highway target. Every Highway module of kt (the GEMMs'
// gemm_*_hwy.cc, act_quant, activation, quant_fast, convert, lora_kernels) builds a HwyFns table of its
// per-target functions with KT_HWY_FNS and asks it for the function of an Isa, so KT_ISA caps every one of
// them the same way and Highway's global chosen-target state (HWY_DYNAMIC_DISPATCH) is never used.
//
// The mapping (HwyTargetOf): kScalar has no Highway target (the module runs its plain C++ truth); kAvx2 is
// HWY_AVX2, kAvx512 HWY_AVX3; kAvx512Vnni is HWY_AVX3_DL, and so are kAvx512Bf16 and kAmx, whose native
// kernels exist only for the GEMMs (the same CPUs run AVX3_DL code for everything else).
//
// Example (in a foreach_target .cc, inside #if HWY_ONCE):
//   using RowFn = void (*)(const bf16_t*, size_t, int8_t*, float*);
//   const HwyFns<RowFn> kRow = KT_HWY_FNS(RowFn, Row);   // N_AVX2::Row, N_AVX3::Row, N_AVX3_DL::Row
//   void QuantizeRow(Isa isa, ...) { if (RowFn fn = kRow.For(isa)) return fn(...); /* scalar */ }
#ifndef KT_KERNELS_HWY_DISPATCH_H_
#define KT_KERNELS_HWY_DISPATCH_H_

#include <hwy/detect_targets.h>  // HWY_TARGETS: which targets this translation unit compiles

#include "kt/kernels/cpu_features.h"

namespace kt {

// The Highway targets kt compiles (HWY_WANT_AVX3_DL adds AVX3_DL to Highway 1.0.3's defaults), in the
// order of Isa.
enum class HwyTarget : int {
  kNone = 0,  // kScalar: no Highway code.
  kAvx2 = 1,
  kAvx3 = 2,
  kAvx3Dl = 3,
};

constexpr HwyTarget HwyTargetOf(Isa isa) {
  return isa == Isa::kScalar   ? HwyTarget::kNone
         : isa == Isa::kAvx2   ? HwyTarget::kAvx2
         : isa == Isa::kAvx512 ? HwyTarget::kAvx3
                               : HwyTarget::kAvx3Dl;
}

// "none", "avx2", "avx3", "avx3_dl" (for test names and benchmark labels).
constexpr const char* HwyTargetName(HwyTarget t) {
  return t == HwyTarget::kNone   ? "none"
         : t == HwyTarget::kAvx2 ? "avx2"
         : t == HwyTarget::kAvx3 ? "avx3"
                                 : "avx3_dl";
}

// Whether this build compiles every Highway target kt dispatches to. False only where a build leaves some
// out on purpose with HWY_DISABLED_TARGETS: tools/test.sh's sanitizer builds on a CPU without AVX-512, whose
// AVX3/AVX3_DL code could not run there anyway. Tests of "which function each Isa gets" skip then.
constexpr bool kAllHwyTargets = (HWY_DISABLED_TARGETS & (HWY_AVX2 | HWY_AVX3 | HWY_AVX3_DL)) == 0;

// One function per Highway target, nullptr where the translation unit did not compile that target.
template <typename Fn>
struct HwyFns {
  Fn avx2 = nullptr;
  Fn avx3 = nullptr;
  Fn avx3_dl = nullptr;

  // The function of exactly `t` (nullptr for kNone or a target not compiled in).
  constexpr Fn At(HwyTarget t) const {
    return t == HwyTarget::kAvx2 ? avx2 : t == HwyTarget::kAvx3 ? avx3 : t == HwyTarget::kAvx3Dl ? avx3_dl
                                                                                                  : nullptr;
  }

  // The function serving `isa`: HwyTargetOf(isa), or the next lower target compiled in if that one was not
  // (a build with fewer targets still runs, on narrower vectors); nullptr for kScalar, whose callers run
  // their plain C++ code.
  constexpr Fn For(Isa isa) const {
    for (int t = static_cast<int>(HwyTargetOf(isa)); t > 0; --t) {
      if (Fn fn = At(static_cast<HwyTarget>(t))) return fn;
    }
    return nullptr;
  }
};

}  // namespace kt

// KT_HWY_FNS(FnType, fn): the HwyFns<FnType> of fn's per-target instances N_AVX2::fn, N_AVX3::fn and
// N_AVX3_DL::fn. Use it in the HWY_ONCE part of a foreach_target .cc, in the namespace that holds those
// N_* namespaces; fn may be a template instance (Gemm<float>).
#if HWY_TARGETS & HWY_AVX2
#define KT_HWY_FN_AVX2(fn) &N_AVX2::fn
#else
#define KT_HWY_FN_AVX2(fn) nullptr
#endif
#if HWY_TARGETS & HWY_AVX3
#define KT_HWY_FN_AVX3(fn) &N_AVX3::fn
#else
#define KT_HWY_FN_AVX3(fn) nullptr
#endif
#if HWY_TARGETS & HWY_AVX3_DL
#define KT_HWY_FN_AVX3_DL(fn) &N_AVX3_DL::fn
#else
#define KT_HWY_FN_AVX3_DL(fn) nullptr
#endif
#define KT_HWY_FNS(FnType, fn) \
  (::kt::HwyFns<FnType>{KT_HWY_FN_AVX2(fn), KT_HWY_FN_AVX3(fn), KT_HWY_FN_AVX3_DL(fn)})

#endif  // KT_KERNELS_HWY_DISPATCH_H_
