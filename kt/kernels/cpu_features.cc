#include "kt/kernels/cpu_features.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kt {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl code, Linux >= 5.16.
constexpr int kXfeatureXtiledata = 18;     // XCR0 bit of the AMX tile data state.

struct Regs {
  uint32_t a = 0, b = 0, c = 0, d = 0;
};

Regs Cpuid(uint32_t leaf, uint32_t subleaf) {
  Regs r;
  __cpuid_count(leaf, subleaf, r.a, r.b, r.c, r.d);
  return r;
}

bool Bit(uint32_t reg, int bit) { return (reg >> bit) & 1u; }

uint64_t Xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

CpuFeatures Detect() {
  CpuFeatures f;
  const uint32_t max_leaf = Cpuid(0, 0).a;
  if (max_leaf < 7) return f;
  const Regs l1 = Cpuid(1, 0);
  const bool osxsave = Bit(l1.c, 27);
  const uint64_t xcr0 = osxsave ? Xgetbv0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  f.os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;

  const Regs l7 = Cpuid(7, 0);
  const Regs l7s1 = Cpuid(7, 1);
  f.fma = os_avx && Bit(l1.c, 12);
  f.f16c = os_avx && Bit(l1.c, 29);
  f.avx2 = os_avx && Bit(l7.b, 5);
  const bool z = f.os_avx512;
  f.avx512f = z && Bit(l7.b, 16);
  f.avx512dq = z && Bit(l7.b, 17);
  f.avx512cd = z && Bit(l7.b, 28);
  f.avx512bw = z && Bit(l7.b, 30);
  f.avx512vl = z && Bit(l7.b, 31);
  f.avx512_vbmi = z && Bit(l7.c, 1);
  f.avx512_vbmi2 = z && Bit(l7.c, 6);
  f.avx512_vnni = z && Bit(l7.c, 11);
  f.avx512_bitalg = z && Bit(l7.c, 12);
  f.avx512_vpopcntdq = z && Bit(l7.c, 14);
  f.avx512_bf16 = z && Bit(l7s1.a, 5);
  // The OS may leave XCR0's tile bits clear until the process asks; CPUID alone decides "present".
  f.amx_bf16 = Bit(l7.d, 22);
  f.amx_tile = Bit(l7.d, 24);
  f.amx_int8 = Bit(l7.d, 25);
  if (f.amx_tile) {
    // Linux requires this request before the first tile instruction; without it the process gets SIGILL.
    const long rc = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata);
    f.amx_permitted = rc == 0;
  }

  uint32_t brand[12] = {};
  if (Cpuid(0x80000000u, 0).a >= 0x80000004u) {
    for (uint32_t i = 0; i < 3; ++i) {
      const Regs r = Cpuid(0x80000002u + i, 0);
      brand[4 * i + 0] = r.a;
      brand[4 * i + 1] = r.b;
      brand[4 * i + 2] = r.c;
      brand[4 * i + 3] = r.d;
    }
    char text[49] = {};
    std::memcpy(text, brand, 48);
    f.brand = std::string(absl::StripAsciiWhitespace(text));
  }
  return f;
}

bool Avx3(const CpuFeatures& f) {
  return f.avx2 && f.fma && f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl;
}
bool Avx3Dl(const CpuFeatures& f) {
  return Avx3(f) && f.avx512_vnni && f.avx512_vbmi && f.avx512_vbmi2 && f.avx512_bitalg &&
         f.avx512_vpopcntdq;
}

// What `isa` needs that `f` lacks, empty if nothing.
std::string Missing(Isa isa, const CpuFeatures& f) {
  std::vector<std::string> m;
  auto need = [&m](bool have, const char* name) {
    if (!have) m.push_back(name);
  };
  if (isa >= Isa::kAvx2) {
    need(f.avx2, "avx2");
    need(f.fma, "fma");
  }
  if (isa >= Isa::kAvx512) {
    need(f.avx512f, "avx512f");
    need(f.avx512bw, "avx512bw");
    need(f.avx512dq, "avx512dq");
    need(f.avx512vl, "avx512vl");
  }
  if (isa >= Isa::kAvx512Vnni) {
    need(f.avx512_vnni, "avx512_vnni");
    need(f.avx512_vbmi, "avx512_vbmi");
    need(f.avx512_vbmi2, "avx512_vbmi2");
    need(f.avx512_bitalg, "avx512_bitalg");
    need(f.avx512_vpopcntdq, "avx512_vpopcntdq");
  }
  if (isa >= Isa::kAvx512Bf16) need(f.avx512_bf16, "avx512_bf16");
  if (isa >= Isa::kAmx) {
    need(f.amx_tile, "amx_tile");
    need(f.amx_bf16, "amx_bf16");
    need(f.amx_int8, "amx_int8");
    if (f.amx_tile) need(f.amx_permitted, "Linux permission for AMX tile data (arch_prctl)");
  }
  return absl::StrJoin(m, ", ");
}

}  // namespace

std::string CpuFeatures::ToString() const {
  std::vector<std::string> on;
  auto add = [&on](bool have, const char* name) {
    if (have) on.push_back(name);
  };
  add(avx2, "avx2");
  add(fma, "fma");
  add(f16c, "f16c");
  add(avx512f, "avx512f");
  add(avx512bw, "avx512bw");
  add(avx512vl, "avx512vl");
  add(avx512dq, "avx512dq");
  add(avx512cd, "avx512cd");
  add(avx512_vnni, "avx512_vnni");
  add(avx512_vbmi, "avx512_vbmi");
  add(avx512_vbmi2, "avx512_vbmi2");
  add(avx512_bf16, "avx512_bf16");
  add(amx_tile, amx_permitted ? "amx_tile" : "amx_tile(no permission)");
  add(amx_bf16, "amx_bf16");
  add(amx_int8, "amx_int8");
  return absl::StrJoin(on, " ");
}

const CpuFeatures& GetCpuFeatures() {
  static const CpuFeatures* const features = new CpuFeatures(Detect());
  return *features;
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx512Vnni:
      return "avx512_vnni";
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
    case Isa::kAmx:
      return "amx";
  }
  return "unknown";
}

absl::StatusOr<Isa> ParseIsa(absl::string_view name) {
  const std::string n = absl::AsciiStrToLower(absl::StripAsciiWhitespace(name));
  for (int i = 0; i <= static_cast<int>(Isa::kAmx); ++i) {
    if (n == IsaName(static_cast<Isa>(i))) return static_cast<Isa>(i);
  }
  if (n == "avx3") return Isa::kAvx512;
  if (n == "avx3_dl") return Isa::kAvx512Vnni;
  return absl::InvalidArgumentError(absl::StrCat(
      "KT_ISA='", name, "' is not a kernel path; expected one of scalar, avx2, avx512, avx512_vnni, ",
      "avx512_bf16, amx"));
}

bool IsaSupported(Isa isa, const CpuFeatures& f) {
  if (isa == Isa::kScalar) return true;
  if (isa == Isa::kAvx2) return f.avx2 && f.fma;
  if (isa == Isa::kAvx512) return Avx3(f);
  if (isa == Isa::kAvx512Vnni) return Avx3Dl(f);
  if (isa == Isa::kAvx512Bf16) return Avx3Dl(f) && f.avx512_bf16;
  return Avx3Dl(f) && f.avx512_bf16 && f.amx_tile && f.amx_bf16 && f.amx_int8 && f.amx_permitted;
}

Isa BestIsa(const CpuFeatures& f) {
  for (int i = static_cast<int>(Isa::kAmx); i > 0; --i) {
    if (IsaSupported(static_cast<Isa>(i), f)) return static_cast<Isa>(i);
  }
  return Isa::kScalar;
}

absl::StatusOr<Isa> ResolveIsa(absl::string_view requested, const CpuFeatures& features) {
  if (absl::StripAsciiWhitespace(requested).empty()) return BestIsa(features);
  absl::StatusOr<Isa> isa = ParseIsa(requested);
  if (!isa.ok()) return isa.status();
  if (!IsaSupported(*isa, features)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "KT_ISA=", IsaName(*isa), " needs CPU features this machine lacks: ", Missing(*isa, features),
        ". The best path here is ", IsaName(BestIsa(features)), " (CPU: ",
        features.brand.empty() ? "unknown" : features.brand, ")."));
  }
  return *isa;
}

}  // namespace kt
