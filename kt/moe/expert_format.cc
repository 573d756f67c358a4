#include "kt/moe/expert_format.h"

#include <cstdlib>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kt/kernels/act_quant.h"
#include "kt/kernels/gemm_bf16.h"
#include "kt/kernels/gemm_fp8.h"
#include "kt/kernels/gemm_gguf.h"
#include "kt/kernels/gguf_quants.h"
#include "kt/kernels/gemm_int4.h"
#include "kt/kernels/gemm_int8.h"
#include "kt/kernels/gemm_mx.h"
#include "kt/kernels/quant_fast.h"

namespace kt {
namespace {

static_assert(kInt8PanelRows == kPanelRows && kInt4PanelRows == kPanelRows && kFp8PanelRows == kPanelRows &&
                  kMxPanelRows == kPanelRows,
              "column blocks address every packed layout alike (16-row panels)");

// ---- kBf16: the weights as given, packed into kt-bf16-panel16-kpair-v1 (gemm_bf16.h). ----
struct Bf16Format {
  static PackedLayout Layout(size_t n, size_t k, size_t /*group*/) {
    PackedLayout l;
    l.panel_bytes = PanelStride(k) * sizeof(bf16_t);
    l.expert_bytes = PackedBf16Size(n, k) * sizeof(bf16_t);
    return l;
  }
  static void Run(const FormatGemm& g, const PackedExpert& w, size_t k, size_t /*group*/, const ProjInput& in,
                  size_t m, size_t cols, float* y, size_t ldy) {
    const auto* panels = reinterpret_cast<const bf16_t*>(w.data);
    if (g.k_block > 0) {
      internal::GemmBf16AmxKBlocked(g.k_block, m, k, in.x, in.ld, panels, cols, y, ldy);
    } else {
      reinterpret_cast<GemmBf16Fn>(g.kernel)(m, k, in.x, in.ld, panels, cols, y, ldy);
    }
  }
  static bool Bind(Isa isa, size_t k_block, FormatGemm* out) {
    const GemmBf16Fn fn = GetGemmBf16(isa);
    if (fn == nullptr) return false;
    out->run = &Run;
    out->kernel = reinterpret_cast<void (*)()>(fn);
    out->k_block = isa == Isa::kAmx ? k_block : 0;  // GemmBf16AmxKBlocked runs on AMX only
    return true;
  }
  static void PackFromBf16(const bf16_t* w, size_t n, size_t k, const MutablePackedExpert& dst) {
    PackBf16(w, k, n, k, reinterpret_cast<bf16_t*>(dst.data));
  }
  static void Unpack(const QuantSpec& /*spec*/, const PackedExpert& w, size_t n, size_t k, bool transposed,
                     bf16_t* out) {
    const auto* panels = reinterpret_cast<const bf16_t*>(w.data);
    if (!transposed) {
      UnpackBf16(panels, n, k, out, k);
      return;
    }
    const size_t stride = PanelStride(k);
    for (size_t row = 0; row < n; ++row) {
      for (size_t kk = 0; kk < k; ++kk) {
        out[kk * n + row] =
            panels[(row / kPanelRows) * stride + ((kk / 2) * kPanelRows + row % kPanelRows) * 2 + (kk & 1)];
      }
    }
  }
  // Each 512-byte block of the panels is one 512-byte block of the transposed panels, read and written
  // once (about half the time of unpacking, transposing and packing again;
  // docs/perf-log/2026-11-27-session-10.md).
  static void Transpose(const PackedExpert& from, size_t n, size_t k, const MutablePackedExpert& to) {
    TransposePackedBf16(reinterpret_cast<const bf16_t*>(from.data), n, k, reinterpret_cast<bf16_t*>(to.data));
  }
  static ExpertFormatTraits Traits() {
    ExpertFormatTraits t{};
    t.format = ExpertFormat::kBf16;
    t.name = "bf16";
    t.packed_layout = "kt-bf16-panel16-kpair-v1";
    t.kernel_family = "bf16";
    t.quantized = false;
    t.grouped = false;
    t.activation = ActivationKind::kBf16Rows;  // the bf16 kernels read the gathered rows as they are
    t.activation_sums = false;
    t.max_k = 0;  // fp32 accumulation: no exactness bound
    t.layout = &Layout;
    t.bind_gemm = &Bind;
    t.pack_bf16 = &PackFromBf16;
    t.pack_quantized = nullptr;
    t.unpack = &Unpack;
    t.transpose_packed = &Transpose;
    return t;
  }
};

// ---- kInt8: kt-int8-channel-v1 packed into kt-int8-panel16-kquad-v1 (gemm_int8.h), with the scales and
// the int32 row sums the VNNI kernel's sign trick needs, per output channel. ----
struct Int8Format {
  static PackedLayout Layout(size_t n, size_t k, size_t /*group*/) {
    PackedLayout l;
    l.panel_bytes = Int8PanelStride(k);
    l.expert_bytes = PackedInt8Bytes(n, k);
    l.scale_entries = l.sum_entries = PackedInt8Rows(n);
    l.scales_per_col = 1;
    return l;
  }
  static void Run(const FormatGemm& g, const PackedExpert& w, size_t k, size_t /*group*/, const ProjInput& in,
                  size_t m, size_t cols, float* y, size_t ldy) {
    const auto* panels = reinterpret_cast<const int8_t*>(w.data);
    if (g.k_block > 0) {
      internal::GemmInt8AmxKBlocked(g.k_block, m, k, in.qx, in.ld, in.sx, panels, w.scales, w.sums, cols, y,
                                    ldy);
    } else {
      reinterpret_cast<GemmInt8Fn>(g.kernel)(m, k, in.qx, in.ld, in.sx, panels, w.scales, w.sums, cols, y, ldy);
    }
  }
  static bool Bind(Isa isa, size_t k_block, FormatGemm* out) {
    const GemmInt8Fn fn = GetGemmInt8(isa);
    if (fn == nullptr) return false;
    out->run = &Run;
    out->kernel = reinterpret_cast<void (*)()>(fn);
    out->k_block = isa == Isa::kAmx ? k_block : 0;  // GemmInt8AmxKBlocked runs on AMX only
    return true;
  }
  static void Pack(const QuantizedMatrix& qm, const MutablePackedExpert& dst) {
    PackInt8(reinterpret_cast<const int8_t*>(qm.data.data()), qm.k, qm.scales.data(), qm.n, qm.k,
             reinterpret_cast<int8_t*>(dst.data), dst.scales, dst.sums);
  }
  // The same one fp32 multiply as Dequantize (quant.h), then one rounding to bf16, through a 256-entry
  // table per row.
  static void Unpack(const QuantSpec& /*spec*/, const PackedExpert& w, size_t n, size_t k, bool transposed,
                     bf16_t* out) {
    const auto* q = reinterpret_cast<const int8_t*>(w.data);
    if (transposed) {
      UnpackInt8ToBf16Transposed(n, k, q, w.scales, out, n);
    } else {
      UnpackInt8ToBf16(n, k, q, w.scales, out, k);
    }
  }
  static ExpertFormatTraits Traits() {
    ExpertFormatTraits t{};
    t.format = ExpertFormat::kInt8;
    t.name = "int8";
    t.packed_layout = "kt-int8-panel16-kquad-v1";
    t.kernel_family = "int8";
    t.quantized = true;
    t.quant_format = QuantFormat::kInt8PerChannel;
    t.grouped = false;
    // int8 x int8 products with exact int32 sums, scaled once per row by both scales.
    t.activation = ActivationKind::kInt8PerRow;
    t.activation_sums = false;
    t.max_k = kInt8MaxK;
    t.layout = &Layout;
    t.bind_gemm = &Bind;
    t.pack_bf16 = nullptr;
    t.pack_quantized = &Pack;
    t.unpack = &Unpack;
    t.transpose_packed = nullptr;
    return t;
  }
};

// ---- The int4 family: kt-int4-channel-v1, -channel-asym-v1, -group{G}-sym-v1, -group{G}-asym-v1, all
// packed into kt-int4-panel16-kblock8-v1 (gemm_int4.h) with scales (and zero points) [panel][group][16]. ----
template <bool kGrouped, bool kAsym>
struct Int4Format {
  static PackedLayout Layout(size_t n, size_t k, size_t group) {
    PackedLayout l;
    l.group = kGrouped ? group : 0;
    l.panel_bytes = Int4PanelStride(k);
    l.expert_bytes = PackedInt4Bytes(n, k);
    l.scale_entries = PackedInt4Scales(n, k, l.group);
    l.zero_entries = kAsym ? l.scale_entries : 0;
    l.scales_per_col = Int4Groups(k, l.group);
    return l;
  }
  static void Run(const FormatGemm& g, const PackedExpert& w, size_t k, size_t group, const ProjInput& in,
                  size_t m, size_t cols, float* y, size_t ldy) {
    reinterpret_cast<GemmInt4Fn>(g.kernel)(m, k, group, in.qx, in.ld, in.sx, in.xsum, w.data, w.scales, w.zeros,
                                           cols, y, ldy);
  }
  static bool Bind(Isa isa, size_t /*k_block*/, FormatGemm* out) {
    const GemmInt4Fn fn = GetGemmInt4(isa);
    if (fn == nullptr) return false;
    out->run = &Run;
    out->kernel = reinterpret_cast<void (*)()>(fn);
    out->k_block = 0;
    return true;
  }
  static void Pack(const QuantizedMatrix& qm, const MutablePackedExpert& dst) {
    // The storage checked spec and shape (PackedExperts::LoadExpertQuantized), so packing cannot fail.
    (void)PackInt4(qm, dst.data, dst.scales, dst.zeros);
  }
  // Dequantize's one fp32 multiply per element and one rounding to bf16, straight from the packed panels
  // through a 16-entry table per group (quant_fast.h), with no canonical copy, fp32 buffer or per-nibble
  // loop (UnpackInt4 + Dequantize); kt/sft unpacks every expert (transposed) to build its backward copy.
  static void Unpack(const QuantSpec& spec, const PackedExpert& w, size_t n, size_t k, bool transposed,
                     bf16_t* out) {
    if (transposed) {
      UnpackInt4ToBf16Transposed(spec, n, k, w.data, w.scales, w.zeros, out, n);
    } else {
      UnpackInt4ToBf16(spec, n, k, w.data, w.scales, w.zeros, out, k);
    }
  }
  static ExpertFormatTraits Traits(ExpertFormat format, const char* name, QuantFormat quant_format) {
    ExpertFormatTraits t{};
    t.format = format;
    t.name = name;
    t.packed_layout = "kt-int4-panel16-kblock8-v1";
    t.kernel_family = "int4";
    t.quantized = true;
    t.quant_format = quant_format;
    t.grouped = kGrouped;
    // int8 activations (per row and group for the group formats: a group's scale must be one number for
    // the exact int32 sum of that group); the kernels add the zero-point term -z * sum(q) per group, hence
    // the activation sums.
    t.activation = kGrouped ? ActivationKind::kInt8PerGroup : ActivationKind::kInt8PerRow;
    t.activation_sums = true;
    t.max_k = kInt4MaxK;
    t.layout = &Layout;
    t.bind_gemm = &Bind;
    t.pack_bf16 = nullptr;
    t.pack_quantized = &Pack;
    t.unpack = &Unpack;
    t.transpose_packed = nullptr;
    return t;
  }
};

using Int4Sym = Int4Format<false, false>;
using Int4Asym = Int4Format<false, true>;
using Int4GroupSym = Int4Format<true, false>;
using Int4GroupAsym = Int4Format<true, true>;

// ---- kFp8Block: kt-fp8-block128-v1 (E4M3 codes, 128 x 128 block scales held per row; DeepSeek-V3's
// `weight` + `weight_scale_inv`) packed into kt-fp8-panel16-kblock128-v1 (gemm_fp8.h) with the scales
// [panel][k block][16]. Products read bf16 rows and decode the codes in registers. ----
struct Fp8BlockFormat {
  static PackedLayout Layout(size_t n, size_t k, size_t /*group*/) {
    PackedLayout l;
    l.panel_bytes = Fp8PanelStride(k);
    l.expert_bytes = PackedFp8Bytes(n, k);
    l.scale_entries = PackedFp8Scales(n, k);
    l.scales_per_col = Fp8KBlocks(k);
    return l;
  }
  static void Run(const FormatGemm& g, const PackedExpert& w, size_t k, size_t /*group*/, const ProjInput& in,
                  size_t m, size_t cols, float* y, size_t ldy) {
    reinterpret_cast<GemmFp8Fn>(g.kernel)(m, k, in.x, in.ld, w.data, w.scales, cols, y, ldy);
  }
  static bool Bind(Isa isa, size_t /*k_block*/, FormatGemm* out) {
    const GemmFp8Fn fn = GetGemmFp8(isa);
    if (fn == nullptr) return false;
    out->run = &Run;
    out->kernel = reinterpret_cast<void (*)()>(fn);
    out->k_block = 0;
    return true;
  }
  static void Pack(const QuantizedMatrix& qm, const MutablePackedExpert& dst) {
    // The storage checked spec and sizes (PackedExperts::LoadExpertQuantized), so packing cannot fail.
    (void)PackFp8(qm, dst.data, dst.scales);
  }
  // fp8 * scale rounded once to bf16 (Dequantize's value), one pass over the packed panels either way.
  static void Unpack(const QuantSpec& /*spec*/, const PackedExpert& w, size_t n, size_t k, bool transposed,
                     bf16_t* out) {
    UnpackFp8ToBf16(n, k, w.data, w.scales, transposed, out, transposed ? n : k);
  }
  static ExpertFormatTraits Traits() {
    ExpertFormatTraits t{};
    t.format = ExpertFormat::kFp8Block;
    t.name = "fp8_block";
    t.packed_layout = "kt-fp8-panel16-kblock128-v1";
    t.kernel_family = "fp8";
    t.quantized = true;
    t.quant_format = QuantFormat::kFp8Block128;
    t.grouped = false;  // the 128 x 128 block is fixed by the format, not MoeConfig::group_size
    t.activation = ActivationKind::kBf16Rows;  // fp32 products of bf16 rows and decoded fp8 weights
    t.activation_sums = false;
    t.max_k = 0;  // fp32 accumulation: no exactness bound
    t.layout = &Layout;
    t.bind_gemm = &Bind;
    t.pack_bf16 = nullptr;
    t.pack_quantized = &Pack;
    t.unpack = &Unpack;
    t.transpose_packed = nullptr;
    t.amx_converts_weights = true;  // GemmFp8Amx: bf16(fp8 * scale) panels, then the BF16 AMX kernel
    return t;
  }
};

// ---- kGguf / kGgufFloat: GGUF tensors' ggml blocks as stored (kt-gguf-rows-v1, gemm_gguf.h): an expert's
// projection is its N rows of GgufRowBytes(type, K) bytes, exactly the file's bytes, so column block c0
// starts c0 rows in (a 16-row "panel" is 16 rows). The layout's group carries the ggml type id. ----
template <bool kFloat>
struct GgufFormat {
  static GgufType TypeOf(size_t type_id) { return static_cast<GgufType>(static_cast<int>(type_id)); }
  static PackedLayout Layout(size_t n, size_t k, size_t type_id) {
    PackedLayout l;
    const GgufType t = TypeOf(type_id);
    l.group = type_id;
    l.panel_bytes = kPanelRows * GgufRowBytes(t, k);
    l.expert_bytes = n * GgufRowBytes(t, k);
    l.act_group = GgufActivationBlock(t);
    return l;
  }
  static void Run(const FormatGemm& g, const PackedExpert& w, size_t k, size_t type_id, const ProjInput& in,
                  size_t m, size_t cols, float* y, size_t ldy) {
    GgufRows rows;
    rows.x = in.x;
    rows.qx = in.qx;
    rows.sx = in.sx;
    rows.ld = in.ld;
    reinterpret_cast<GemmGgufFn>(g.kernel)(TypeOf(type_id), m, k, rows, w.data, cols, y, ldy);
  }
  static bool Bind(Isa isa, size_t /*k_block*/, FormatGemm* out) {
    const GemmGgufFn fn = GetGemmGguf(isa);
    if (fn == nullptr) return false;
    out->run = &Run;
    out->kernel = reinterpret_cast<void (*)()>(fn);
    out->k_block = 0;
    return true;
  }
  // The ggml values (DequantizeGgufRow) rounded once to bf16.
  static void Unpack(const QuantSpec& spec, const PackedExpert& w, size_t n, size_t k, bool transposed,
                     bf16_t* out) {
    const GgufType t = TypeOf(static_cast<size_t>(spec.group_size));
    std::vector<float> row(k);
    for (size_t r = 0; r < n; ++r) {
      DequantizeGgufRow(t, w.data + r * GgufRowBytes(t, k), k, row.data());
      for (size_t c = 0; c < k; ++c) (transposed ? out[c * n + r] : out[r * k + c]) = F32ToBf16(row[c]);
    }
  }
  static absl::Status Check(const char* what, size_t n, size_t k, int type_id) {
    if (!IsGgufTypeId(type_id)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": ggml type id ", type_id,
                                                     " is not one LLAMAFILE runs; supported: ", kGgufSupportedTypes));
    }
    const GgufType t = static_cast<GgufType>(type_id);
    if (GgufIsFloat(t) != kFloat) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " is ", GgufTypeName(t), ": a ", kFloat ? "gguf_float" : "gguf", " layer holds ",
          kFloat ? "F32, F16 or BF16" : "quantized ggml types (Q4_0 .. Q6_K)",
          " projections; float and quantized projections in one layer are not supported"));
    }
    if (n == 0 || k % GgufBlockElems(t) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(what, " [", n, ", ", k, "] of type ", GgufTypeName(t),
                                                     ": K = ", k, " must be a multiple of the type's block of ",
                                                     GgufBlockElems(t), " values"));
    }
    return absl::OkStatus();
  }
  static ExpertFormatTraits Traits() {
    ExpertFormatTraits t{};
    t.format = kFloat ? ExpertFormat::kGgufFloat : ExpertFormat::kGguf;
    t.name = kFloat ? "gguf_float" : "gguf";
    t.packed_layout = "kt-gguf-rows-v1";
    t.kernel_family = "gguf";
    t.quantized = false;  // no QuantFormat: the blocks come from the file (stored_blocks)
    t.grouped = false;
    // Quantized types: int8 per 32 (Q8_0) or 256 (Q8_K) values, the group per projection (act_group);
    // the float types multiply bf16 rows.
    t.activation = kFloat ? ActivationKind::kBf16Rows : ActivationKind::kInt8PerGroup;
    t.activation_sums = false;
    t.max_k = kGgufMaxK + 1;  // the kernels' bound (K <= kGgufMaxK); the sums are exact per block
    t.layout = &Layout;
    t.bind_gemm = &Bind;
    t.pack_bf16 = nullptr;
    t.pack_quantized = nullptr;
    t.unpack = &Unpack;
    t.transpose_packed = nullptr;
    t.stored_blocks = true;
    t.check_projection = &Check;
    return t;
  }
};

// ---- kMxfp4 / kMxfp8: kt-mxfp4-v1 / kt-mxfp8-v1 (OCP MX: E2M1 or E4M3 codes, an E8M0 scale per 32 k)
// packed into kt-mx-panel16-kblock32-v1 (gemm_mx.h). The E8M0 codes are bytes, kept in the packed expert's
// uint8 array (`zeros`, [panel][k block][16]: addressed per column like a zero point). Products read bf16
// rows and decode in registers. ----
template <bool kFp4>
struct MxFormat {
  static PackedLayout Layout(size_t n, size_t k, size_t /*group*/) {
    PackedLayout l;
    l.panel_bytes = MxPanelStride(kFp4, k);
    l.expert_bytes = PackedMxBytes(kFp4, n, k);
    l.zero_entries = PackedMxScales(n, k);
    l.scales_per_col = k / kMxBlockK;
    return l;
  }
  static void Run(const FormatGemm& g, const PackedExpert& w, size_t k, size_t /*group*/, const ProjInput& in,
                  size_t m, size_t cols, float* y, size_t ldy) {
    reinterpret_cast<GemmMxFn>(g.kernel)(m, k, in.x, in.ld, w.data, w.zeros, cols, y, ldy);
  }
  static bool Bind(Isa isa, size_t /*k_block*/, FormatGemm* out) {
    const GemmMxFn fn = GetGemmMx(kFp4, isa);
    if (fn == nullptr) return false;
    out->run = &Run;
    out->kernel = reinterpret_cast<void (*)()>(fn);
    out->k_block = 0;
    return true;
  }
  static void Pack(const QuantizedMatrix& qm, const MutablePackedExpert& dst) {
    // The storage checked spec and sizes; the scales are powers of two by construction (Quantize, or E8M0
    // codes read from a checkpoint), so packing cannot fail.
    (void)PackMx(qm, dst.data, dst.zeros);
  }
  static void Unpack(const QuantSpec& /*spec*/, const PackedExpert& w, size_t n, size_t k, bool transposed,
                     bf16_t* out) {
    UnpackMxToBf16(kFp4, n, k, w.data, w.zeros, transposed, out, transposed ? n : k);
  }
  static ExpertFormatTraits Traits() {
    ExpertFormatTraits t{};
    t.format = kFp4 ? ExpertFormat::kMxfp4 : ExpertFormat::kMxfp8;
    t.name = kFp4 ? "mxfp4" : "mxfp8";
    t.packed_layout = "kt-mx-panel16-kblock32-v1";
    t.kernel_family = "mx";
    t.quantized = true;
    t.quant_format = kFp4 ? QuantFormat::kMxfp4 : QuantFormat::kMxfp8;
    t.grouped = false;  // the block of 32 is fixed by the format
    t.activation = ActivationKind::kBf16Rows;
    t.activation_sums = false;
    t.max_k = 0;
    t.layout = &Layout;
    t.bind_gemm = &Bind;
    t.pack_bf16 = nullptr;
    t.pack_quantized = &Pack;
    t.unpack = &Unpack;
    t.transpose_packed = nullptr;
    return t;
  }
};

// The table, in ExpertFormat order (FormatTraits indexes it by the enumerator). Built on first use.
const ExpertFormatTraits* Table() {
  static const ExpertFormatTraits kFormats[] = {
      Bf16Format::Traits(),
      Int8Format::Traits(),
      Int4Sym::Traits(ExpertFormat::kInt4, "int4", QuantFormat::kInt4PerChannel),
      Int4GroupSym::Traits(ExpertFormat::kInt4GroupSym, "int4_group_sym", QuantFormat::kInt4GroupSym),
      Int4GroupAsym::Traits(ExpertFormat::kInt4GroupAsym, "int4_group_asym", QuantFormat::kInt4GroupAsym),
      Int4Asym::Traits(ExpertFormat::kInt4Asym, "int4_asym", QuantFormat::kInt4PerChannelAsym),
      Fp8BlockFormat::Traits(),
      GgufFormat<false>::Traits(),
      GgufFormat<true>::Traits(),
      MxFormat<true>::Traits(),
      MxFormat<false>::Traits(),
  };
  // FormatTraits indexes by the enumerator: a row out of order is a bug of this file, caught at first use.
  static const bool in_order = [] {
    for (int i = 0; i < static_cast<int>(sizeof(kFormats) / sizeof(kFormats[0])); ++i) {
      if (static_cast<int>(kFormats[i].format) != i) std::abort();
    }
    return true;
  }();
  (void)in_order;
  return kFormats;
}
constexpr int kNumFormats = 11;

}  // namespace

const ExpertFormatTraits& FormatTraits(ExpertFormat format) { return Table()[static_cast<int>(format)]; }

const char* ExpertFormatName(ExpertFormat format) {
  const int i = static_cast<int>(format);
  return i >= 0 && i < kNumFormats ? Table()[i].name : "unknown";
}

absl::StatusOr<ExpertFormat> ParseExpertFormat(absl::string_view name) {
  for (int i = 0; i < kNumFormats; ++i) {
    if (name == Table()[i].name) return Table()[i].format;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown expert format '", name,
                                                 "'; expected bf16, int8, int4, int4_asym, int4_group_sym, "
                                                 "int4_group_asym, fp8_block, gguf, gguf_float, mxfp4 or mxfp8"));
}

const char* ExpertProjName(ExpertProj proj) {
  switch (proj) {
    case ExpertProj::kGate:
      return "gate";
    case ExpertProj::kUp:
      return "up";
    case ExpertProj::kDown:
      return "down";
  }
  return "unknown";
}

absl::StatusOr<QuantSpec> QuantSpecOf(ExpertFormat format, int group_size) {
  const ExpertFormatTraits& t = FormatTraits(format);
  if (!t.quantized) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert format ", t.name, " is not a quantized format"));
  }
  if (!t.grouped) return QuantSpec{t.quant_format, 0};
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("group_size = ", group_size, " for ", t.name, " experts; expected 32, 64 or 128"));
  }
  return QuantSpec{t.quant_format, group_size};
}

size_t ActivationGroupsOf(const ExpertFormatTraits& traits, size_t k, size_t group) {
  return traits.activation == ActivationKind::kInt8PerGroup ? k / group : 1;
}

size_t ActivationBytes(const ExpertFormatTraits& traits) {
  return traits.activation == ActivationKind::kBf16Rows ? sizeof(bf16_t) : 1;
}

void PrepareActivationRow(const ExpertFormatTraits& traits, Isa isa, const bf16_t* x, size_t k, size_t group,
                          int8_t* q, float* scales, int32_t* sums) {
  // The vectorized quantizers (act_quant.h), bit-identical to quant.h's; group and k were validated when
  // the storage was created.
  switch (traits.activation) {
    case ActivationKind::kBf16Rows:
      return;
    case ActivationKind::kInt8PerRow:
      QuantizeRowInt8(isa, x, k, q, scales);
      break;
    case ActivationKind::kInt8PerGroup:
      QuantizeRowInt8Grouped(isa, x, k, group, q, scales);
      break;
  }
  if (traits.activation_sums) {
    Int4ActivationSums(1, k, traits.activation == ActivationKind::kInt8PerGroup ? group : 0, q, k, sums);
  }
}

}  // namespace kt
