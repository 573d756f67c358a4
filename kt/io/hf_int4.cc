#include "kt/io/hf_int4.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "kt/io/arch.h"
#include "kt/io/json.h"
#include "kt/io/status_macros.h"
#include "kt/io/safetensors.h"
#include "kt/kernels/dtype.h"

namespace kt {
namespace {

std::string Where(const Checkpoint::Located& loc) {
  return absl::StrCat(loc.file->path(), ": tensor \"", loc.info->name, "\"");
}

std::string JsonText(const json::Value& v) {
  switch (v.type()) {
    case json::Value::Type::kString:
      return json::Quote(v.as_string());
    case json::Value::Type::kInt:
      return absl::StrCat(v.as_int());
    case json::Value::Type::kBool:
      return v.as_bool() ? "true" : "false";
    case json::Value::Type::kNull:
      return "null";
    default:
      return json::TypeName(v.type());
  }
}

// One field of quantization_config (`path` is its dotted name for errors).
struct Field {
  const std::string* origin;
  std::string path;
  const json::Value* v;
  absl::Status Bad(absl::string_view want) const {
    return absl::InvalidArgumentError(absl::StrCat(*origin, ": quantization_config.", path, " is ",
                                                   v == nullptr ? "missing" : JsonText(*v), "; ", want));
  }
};

Field Get(const std::string& origin, const json::Value& obj, const std::string& prefix, absl::string_view key) {
  return Field{&origin, absl::StrCat(prefix, key), obj.Find(key)};
}

bool IsTrue(const json::Value* v) { return v != nullptr && v->is_bool() && v->as_bool(); }
bool IsFalseOrAbsent(const json::Value* v) { return v == nullptr || v->is_null() || (v->is_bool() && !v->as_bool()); }
bool IsString(const json::Value* v, absl::string_view s) { return v != nullptr && v->is_string() && v->as_string() == s; }

bool GroupSizeOk(int64_t g) { return g == 32 || g == 64 || g == 128; }

absl::StatusOr<HfInt4Config> ParsePackQuantized(const std::string& origin, const json::Value& q) {
  HfInt4Config out;
  out.kind = HfInt4Kind::kPackQuantized;
  if (Field f = Get(origin, q, "", "format"); !IsString(f.v, "pack-quantized")) {
    return f.Bad("kt reads compressed-tensors INT4 in the \"pack-quantized\" format (method RAWINT4)");
  }
  Field groups = Get(origin, q, "", "config_groups");
  if (groups.v == nullptr || !groups.v->is_object() || groups.v->members().empty()) {
    return groups.Bad("expected an object of quantization groups (compressed-tensors' config_groups)");
  }
  for (const auto& [name, group] : groups.v->members()) {
    const std::string prefix = absl::StrCat("config_groups.", name, ".weights.");
    const json::Value* w = group.Find("weights");
    if (w == nullptr || !w->is_object()) {
      return Field{&origin, absl::StrCat("config_groups.", name, ".weights"), w}.Bad("expected an object");
    }
    if (Field f = Get(origin, *w, prefix, "num_bits"); f.v == nullptr || !f.v->is_int() || f.v->as_int() != 4) {
      return f.Bad("kt reads 4-bit weights (method RAWINT4)");
    }
    if (Field f = Get(origin, *w, prefix, "type"); !IsString(f.v, "int")) return f.Bad("expected \"int\"");
    if (Field f = Get(origin, *w, prefix, "symmetric"); !IsTrue(f.v)) {
      return f.Bad("kt reads symmetric pack-quantized INT4 only (no weight_zero_point)");
    }
    if (Field f = Get(origin, *w, prefix, "strategy"); !IsString(f.v, "group")) {
      return f.Bad("kt reads the \"group\" strategy (a scale per group of K)");
    }
    if (Field f = Get(origin, *w, prefix, "actorder"); !IsFalseOrAbsent(f.v)) {
      return f.Bad("kt reads pack-quantized INT4 without activation reordering (actorder null)");
    }
    Field g = Get(origin, *w, prefix, "group_size");
    int size = 0;
    if (g.v != nullptr && !g.v->is_null()) {
      if (!g.v->is_int() || !GroupSizeOk(g.v->as_int())) return g.Bad("kt's int4 groups are 32, 64 or 128");
      size = static_cast<int>(g.v->as_int());
    }
    if (out.group_size != 0 && size != 0 && size != out.group_size) {
      return g.Bad(absl::StrCat("another config group has group_size ", out.group_size,
                                "; kt reads one group size per checkpoint"));
    }
    if (size != 0) out.group_size = size;
  }
  return out;
}

absl::StatusOr<HfInt4Config> ParseGptq(const std::string& origin, const json::Value& q) {
  HfInt4Config out;
  out.kind = HfInt4Kind::kGptq;
  if (Field f = Get(origin, q, "", "bits"); f.v == nullptr || !f.v->is_int() || f.v->as_int() != 4) {
    return f.Bad("kt reads 4-bit GPTQ only (method GPTQ_INT4)");
  }
  if (Field f = Get(origin, q, "", "sym"); !IsTrue(f.v)) {
    return f.Bad("kt reads GPTQ with sym true only (zero point 8 for every group)");
  }
  if (Field f = Get(origin, q, "", "desc_act"); !IsFalseOrAbsent(f.v)) {
    return f.Bad("kt reads GPTQ with desc_act false only (no activation reordering: g_idx[k] = k / group_size)");
  }
  Field g = Get(origin, q, "", "group_size");
  if (g.v == nullptr || !g.v->is_int() || !GroupSizeOk(g.v->as_int())) {
    return g.Bad("kt reads GPTQ with group_size 32, 64 or 128 (not -1, per channel)");
  }
  out.group_size = static_cast<int>(g.v->as_int());
  Field fmt = Get(origin, q, "", "checkpoint_format");
  if (fmt.v == nullptr) fmt = Get(origin, q, "", "format");
  if (fmt.v == nullptr || IsString(fmt.v, "gptq")) {
    out.gptq_stored_zero = 7;  // v1: qzeros hold zero - 1
  } else if (IsString(fmt.v, "gptq_v2")) {
    out.gptq_stored_zero = 8;
  } else {
    return fmt.Bad("kt reads GPTQ checkpoints in the \"gptq\" or \"gptq_v2\" format");
  }
  return out;
}

absl::StatusOr<std::string> ReadText(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::string text;
  char buf[65536];
  size_t got = 0;
  while ((got = std::fread(buf, 1, sizeof(buf), file)) > 0 && text.size() < (size_t{64} << 20)) {
    text.append(buf, got);
  }
  const bool failed = std::ferror(file) != 0;
  std::fclose(file);
  if (failed) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return text;
}

// A tensor of the matrix: present, one of `dtypes` (the first is named as expected), `shape`.
absl::Status Need(const Checkpoint& ckpt, const std::string& name, std::initializer_list<Dtype> dtypes,
                  const std::vector<int64_t>& shape, absl::string_view what, absl::string_view shape_doc,
                  Checkpoint::Located* out) {
  std::string want;
  for (Dtype d : dtypes) absl::StrAppend(&want, want.empty() ? "" : " or ", DtypeName(d));
  absl::StrAppend(&want, " ", ShapeString(shape), " (", shape_doc, ")");
  const Checkpoint::Located loc = ckpt.Find(name);
  if (loc.info == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(ckpt.dir(), ": ", what, ": tensor \"", name, "\" is missing (expected ", want, ")"));
  }
  bool dtype_ok = false;
  for (Dtype d : dtypes) dtype_ok = dtype_ok || loc.info->dtype == d;
  if (!dtype_ok || loc.info->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(Where(loc), " (", what, ") is ", DtypeName(loc.info->dtype), " ",
                                                   ShapeString(loc.info->shape), ", expected ", want));
  }
  *out = loc;
  return absl::OkStatus();
}

uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

float F16ToF32(uint16_t h) {
  const int exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ffu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);  // subnormal: m * 2^-24
  } else if (exp == 31) {
    v = mant != 0 ? std::nanf("") : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(mant | 0x400u), exp - 25);  // (1024 + m) * 2^(e - 25)
  }
  return (h & 0x8000u) ? -v : v;
}

// Scale element i of `loc` (BF16, F16 or F32) as fp32, exactly.
float ScaleAt(const Checkpoint::Located& loc, size_t i) {
  const uint8_t* p = loc.file->data(*loc.info);
  if (loc.info->dtype == Dtype::kF32) {
    float f;
    std::memcpy(&f, p + i * 4, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p + i * 2, 2);
  if (loc.info->dtype == Dtype::kF16) return F16ToF32(h);
  bf16_t b;
  b.bits = h;
  return Bf16ToF32(b);
}

absl::Status CheckGptqValues(const HfInt4Config& c, const HfInt4Matrix& m, int64_t k, int group) {
  const uint8_t* z = m.zeros.info == nullptr ? nullptr : m.zeros.file->data(*m.zeros.info);
  const size_t words = m.zeros.info == nullptr ? 0 : m.zeros.info->num_bytes() / 4;
  const uint32_t want = 0x11111111u * static_cast<uint32_t>(c.gptq_stored_zero);
  for (size_t i = 0; i < words; ++i) {
    if (LoadU32(z + i * 4) != want) {
      return absl::InvalidArgumentError(absl::StrCat(
          Where(m.zeros), " word ", i, " is 0x", absl::Hex(LoadU32(z + i * 4), absl::kZeroPad8), ", expected 0x",
          absl::Hex(want, absl::kZeroPad8), ": quantization_config.sym is true, so every zero point must be 8 "
          "(stored as ", c.gptq_stored_zero, ")"));
    }
  }
  if (m.g_idx.info == nullptr) return absl::OkStatus();
  const uint8_t* g = m.g_idx.file->data(*m.g_idx.info);
  for (int64_t i = 0; i < k; ++i) {
    const int32_t v = static_cast<int32_t>(LoadU32(g + i * 4));
    if (v != i / group) {
      return absl::InvalidArgumentError(absl::StrCat(Where(m.g_idx), " element ", i, " is ", v, ", expected ",
                                                     i / group, " (k / group_size: desc_act false)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

bool IsHfInt4QuantMethod(absl::string_view quant_method) {
  return quant_method == "compressed-tensors" || quant_method == "gptq";
}

const char* HfInt4Method(HfInt4Kind kind) { return kind == HfInt4Kind::kGptq ? "GPTQ_INT4" : "RAWINT4"; }

absl::StatusOr<HfInt4Config> ReadHfInt4Config(const std::string& config_path) {
  absl::StatusOr<std::string> text = ReadText(config_path);
  if (!text.ok()) return text.status();
  json::ParseOptions options;
  options.allow_fractions = true;
  absl::StatusOr<json::Value> root = json::Parse(*text, options);
  if (!root.ok()) return absl::InvalidArgumentError(absl::StrCat(config_path, ": ", root.status().message()));
  const json::Value* q = root->Find("quantization_config");
  if (q == nullptr || !q->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": no quantization_config object"));
  }
  const json::Value* method = q->Find("quant_method");
  if (IsString(method, "compressed-tensors")) return ParsePackQuantized(config_path, *q);
  if (IsString(method, "gptq")) return ParseGptq(config_path, *q);
  return Field{&config_path, "quant_method", method}.Bad(
      "expected \"compressed-tensors\" (method RAWINT4) or \"gptq\" (method GPTQ_INT4)");
}

absl::Status FindHfInt4Matrix(const Checkpoint& ckpt, const HfInt4Config& config, absl::string_view weight_name,
                              int64_t n, int64_t k, absl::string_view what, int* group, HfInt4Matrix* out) {
  absl::string_view base = weight_name;
  if (!absl::ConsumeSuffix(&base, ".weight")) {
    return absl::InternalError(absl::StrCat("FindHfInt4Matrix: \"", weight_name, "\" does not end in .weight"));
  }
  const auto name = [&](absl::string_view part) { return absl::StrCat(base, ".", part); };
  const bool gptq = config.kind == HfInt4Kind::kGptq;
  // The scales fix G when the layer has none yet.
  const std::string scale_name = name(gptq ? "scales" : "weight_scale");
  if (*group == 0) {
    const Checkpoint::Located s = ckpt.Find(scale_name);
    const int64_t groups = s.info == nullptr || s.info->shape.size() != 2 ? 0 : s.info->shape[gptq ? 0 : 1];
    if (groups > 0 && k % groups == 0 && GroupSizeOk(k / groups)) *group = static_cast<int>(k / groups);
    if (*group == 0) *group = 32;  // Reported as a shape error below, naming the tensor.
  }
  const int64_t g = *group;
  if (k % g != 0) {
    return absl::InvalidArgumentError(absl::StrCat(ckpt.dir(), ": ", what, ": K = ", k,
                                                   " is not a multiple of the group size ", g));
  }
  if (!gptq) {
    const Checkpoint::Located p = ckpt.Find(name("weight_packed"));
    const bool bytes = p.info != nullptr && p.info->dtype == Dtype::kU8;
    KT_RETURN_IF_ERROR(Need(ckpt, name("weight_packed"), {Dtype::kI32, Dtype::kU8}, {n, bytes ? k / 2 : k / 8}, what,
                            bytes ? "[N, K/2]: 2 nibbles per byte" : "[N, K/8]: 8 nibbles per int32", &out->packed));
    KT_RETURN_IF_ERROR(Need(ckpt, scale_name, {Dtype::kBf16, Dtype::kF16, Dtype::kF32}, {n, k / g}, what,
                            absl::StrCat("[N, K/G], G = ", g), &out->scale));
    const Checkpoint::Located s = ckpt.Find(name("weight_shape"));
    const bool i64 = s.info != nullptr && s.info->dtype == Dtype::kI64;
    KT_RETURN_IF_ERROR(Need(ckpt, name("weight_shape"), {Dtype::kI32, Dtype::kI64}, {2}, what, "[N, K]", &out->shape));
    const uint8_t* d = out->shape.file->data(*out->shape.info);
    int64_t v[2];
    for (int i = 0; i < 2; ++i) {
      int32_t v32;
      std::memcpy(i64 ? static_cast<void*>(&v[i]) : static_cast<void*>(&v32), d + i * (i64 ? 8 : 4), i64 ? 8 : 4);
      if (!i64) v[i] = v32;
    }
    if (v[0] != n || v[1] != k) {
      return absl::InvalidArgumentError(absl::StrCat(Where(out->shape), " (", what, ") holds [", v[0], ", ", v[1],
                                                     "], expected [", n, ", ", k, "]"));
    }
    return absl::OkStatus();
  }
  if (n % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(ckpt.dir(), ": ", what, ": N = ", n,
                                                   " is not a multiple of 8 (GPTQ packs qzeros 8 per int32)"));
  }
  KT_RETURN_IF_ERROR(Need(ckpt, name("qweight"), {Dtype::kI32}, {k / 8, n}, what, "[K/8, N]", &out->packed));
  KT_RETURN_IF_ERROR(Need(ckpt, scale_name, {Dtype::kF16}, {k / g, n}, what, absl::StrCat("[K/G, N], G = ", g),
                          &out->scale));
  out->zeros = {};  // optional: sym GPTQ's zero point is 8 whatever it stores (the original ignores qzeros)
  if (ckpt.Find(name("qzeros")).info != nullptr) {
    KT_RETURN_IF_ERROR(Need(ckpt, name("qzeros"), {Dtype::kI32}, {k / g, n / 8}, what, "[K/G, N/8]", &out->zeros));
  }
  out->g_idx = {};
  if (ckpt.Find(name("g_idx")).info != nullptr) {
    KT_RETURN_IF_ERROR(Need(ckpt, name("g_idx"), {Dtype::kI32}, {k}, what, "[K]", &out->g_idx));
  }
  return CheckGptqValues(config, *out, k, static_cast<int>(g));
}

absl::Status ReadHfInt4Matrix(const HfInt4Config& config, const HfInt4Matrix& m, size_t n, size_t k, int group,
                              QuantizedMatrix* out) {
  out->spec = QuantSpec{QuantFormat::kInt4GroupSym, group};
  out->n = n;
  out->k = k;
  out->zeros.clear();
  const size_t row_bytes = k / 2, groups = k / static_cast<size_t>(group);
  out->data.resize(n * row_bytes);
  out->scales.resize(n * groups);
  const uint8_t* src = m.packed.file->data(*m.packed.info);
  const bool gptq = config.kind == HfInt4Kind::kGptq;
  if (!gptq) {
    // Little-endian int32 words of 8 nibbles (element 8i + j at bits 4j) are, byte for byte, kt's nibble
    // order (element 2i low, 2i + 1 high), as uint8 storage is: only the bias differs, u = q + 8 -> q's
    // two's complement is u with bit 3 flipped.
    for (size_t i = 0; i < n * row_bytes; ++i) out->data[i] = src[i] ^ 0x88;
    for (size_t i = 0; i < n * groups; ++i) out->scales[i] = ScaleAt(m.scale, i);
  } else {
    // qweight [K/8, N]: word (i, c) holds u of k = 8i + j (bits 4j) of column c. Flipping bit 3 of each
    // nibble gives q = u - 8 in two's complement, and byte b of the word is then kt's byte 4i + b of row c
    // (elements 8i + 2b low, 8i + 2b + 1 high): the transpose moves whole words.
    std::fill(out->data.begin(), out->data.end(), 0);
    for (size_t i = 0; i < k / 8; ++i) {
      for (size_t c = 0; c < n; ++c) {
        const uint32_t w = LoadU32(src + (i * n + c) * 4) ^ 0x88888888u;  // u - 8 as two's-complement nibbles
        uint8_t* row = out->data.data() + c * row_bytes + i * 4;
        for (int b = 0; b < 4; ++b) row[b] = static_cast<uint8_t>(w >> (8 * b));
      }
    }
    for (size_t g = 0; g < groups; ++g) {
      for (size_t c = 0; c < n; ++c) out->scales[c * groups + g] = ScaleAt(m.scale, g * n + c);
    }
  }
  for (size_t i = 0; i < out->scales.size(); ++i) {
    if (!std::isfinite(out->scales[i])) {
      const size_t at = gptq ? (i % groups) * n + i / groups : i;
      return absl::DataLossError(absl::StrCat(Where(m.scale), " element ", at, " is ", out->scales[i],
                                              ": a scale must be finite"));
    }
  }
  return absl::OkStatus();
}

void PackQuantizedToCanonical(const uint8_t* packed, const uint16_t* scale_bits, size_t n, size_t k, int group,
                              QuantizedMatrix* out) {
  out->spec = QuantSpec{QuantFormat::kInt4GroupSym, group};
  out->n = n;
  out->k = k;
  out->zeros.clear();
  out->data.resize(n * k / 2);
  out->scales.resize(n * (k / static_cast<size_t>(group)));
  for (size_t i = 0; i < out->data.size(); ++i) out->data[i] = packed[i] ^ 0x88;  // u = q + 8 -> q
  for (size_t i = 0; i < out->scales.size(); ++i) {
    bf16_t b;
    std::memcpy(&b.bits, scale_bits + i, 2);
    out->scales[i] = Bf16ToF32(b);
  }
}

absl::StatusOr<int> HfInt4GroupSize(const std::string& dir) {
  absl::StatusOr<MoeArch> arch = LoadMoeConfig(dir);
  if (!arch.ok()) return arch.status();
  if (!arch->quantization.has_value() || !IsHfInt4QuantMethod(arch->quantization->quant_method)) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, "/config.json: not a native int4 checkpoint (quantization_config.quant_method \"compressed-tensors\" "
        "or \"gptq\"); methods RAWINT4 and GPTQ_INT4 read those (or a kt convert folder of their layout)"));
  }
  absl::StatusOr<HfInt4Config> config = ReadHfInt4Config(absl::StrCat(dir, "/config.json"));
  if (!config.ok()) return config.status();
  if (config->group_size != 0) return config->group_size;
  if (arch->moe_layers.empty() || arch->fused_experts()) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": no per-expert MoE layer to take the group size from"));
  }
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
  if (!ckpt.ok()) return ckpt.status();
  absl::StatusOr<ExpertNames> names = ExpertTensorNames(*arch, arch->moe_layers.front(), 0);
  if (!names.ok()) return names.status();
  int group = 0;
  HfInt4Matrix m;
  KT_RETURN_IF_ERROR(FindHfInt4Matrix(**ckpt, *config, names->gate, arch->intermediate, arch->hidden,
                                      "expert 0 gate", &group, &m));
  return group;
}

}  // namespace kt
