#include "kt/io/layer_experts.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kt/io/checksum.h"
#include "kt/io/hf_fp8.h"
#include "kt/io/hf_mx.h"

namespace kt {
namespace {

constexpr const char* kMatrixNames[3] = {"gate", "up", "down"};

bool IsFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// The shape checks every folder kind shares: the caller's E, H, I (when given) against the folder's.
absl::Status CheckShape(absl::string_view origin, absl::string_view e_key, absl::string_view h_key,
                        absl::string_view i_key, int e, int h, int i, const LayerRequest& want) {
  const std::pair<absl::string_view, std::pair<int, int>> fields[] = {
      {e_key, {e, want.num_experts}}, {h_key, {h, want.hidden}}, {i_key, {i, want.intermediate}}};
  static const char* kWrapperNames[] = {"num_experts", "hidden_size", "moe_intermediate_size"};
  for (int f = 0; f < 3; ++f) {
    const int have = fields[f].second.first, asked = fields[f].second.second;
    if (asked >= 0 && asked != have) {
      return absl::InvalidArgumentError(absl::StrCat(origin, ": ", fields[f].first, " = ", have,
                                                     ", but the layer was created with ", kWrapperNames[f],
                                                     " = ", asked));
    }
  }
  return absl::OkStatus();
}

std::string TensorWhere(const Checkpoint::Located& loc) {
  return absl::StrCat(loc.file->path(), ": tensor \"", loc.info->name, "\"");
}

// A checkpoint tensor must be bf16 with `shape`; FP8 is named as not supported yet.
absl::Status CheckHfTensor(const Checkpoint& ckpt, const std::string& name, std::vector<int64_t> shape,
                           Checkpoint::Located* out, absl::string_view what) {
  const Checkpoint::Located loc = ckpt.Find(name);
  if (loc.info == nullptr) {
    return absl::NotFoundError(absl::StrCat(ckpt.dir(), ": ", what, ": tensor \"", name,
                                            "\" is missing (expected BF16 ", ShapeString(shape), ")"));
  }
  if (loc.info->dtype == Dtype::kF8E4M3) {
    return absl::UnimplementedError(absl::StrCat(
        TensorWhere(loc), " is FP8 (F8_E4M3): FP8 expert weights are not supported yet (the FP8 method comes "
        "later); use a bf16 checkpoint"));
  }
  if (loc.info->dtype != Dtype::kBf16 || loc.info->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(TensorWhere(loc), " (", what, ") is ",
                                                   DtypeName(loc.info->dtype), " ", ShapeString(loc.info->shape),
                                                   ", expected BF16 ", ShapeString(shape)));
  }
  *out = loc;
  return absl::OkStatus();
}

// Whether the layer's experts are MX-coded (expert 0's gate stored as codes, not bf16): an MX method then
// reads them as stored, whatever quantization_config says of the other weights (DeepSeek-V4 ships those as
// block FP8); another method is told which one to use.
absl::StatusOr<bool> MxCodedFolder(const Checkpoint& ckpt, const MoeArch& arch, const LayerRequest& want,
                                   const std::string& config_path) {
  if (arch.fused_experts() || !arch.IsMoeLayer(want.layer)) return false;
  const absl::StatusOr<ExpertNames> names = ExpertTensorNames(arch, want.layer, 0);
  if (!names.ok()) return false;  // reported when the tensors are checked
  const bool mx_method = want.method.quantized && IsMxFormat(want.method.spec.format);
  if (mx_method) return HfMxCoded(ckpt, names->gate, want.method.spec.format);
  if (arch.family == MoeFamily::kDeepseekV4 && HfMxCoded(ckpt, names->gate, QuantFormat::kMxfp4)) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": the routed experts are MXFP4 (tensor \"",
                                                   names->gate, "\" is E2M1 nibble pairs), which method ",
                                                   want.method.method, " cannot hold; load it with method MXFP4"));
  }
  if (arch.family == MoeFamily::kMiniMaxM3 && HfMxCoded(ckpt, names->gate, QuantFormat::kMxfp8) &&
      ckpt.Find(Fp8ScaleInvName(names->gate)).info != nullptr &&
      ckpt.Find(Fp8ScaleInvName(names->gate)).info->dtype != Dtype::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": the routed experts are MXFP8 (tensor \"",
                                                   names->gate, "\" is F8_E4M3 with E8M0 scales per 32), which "
                                                   "method ", want.method.method,
                                                   " cannot hold; load it with method MXFP8"));
  }
  return false;
}

void CopyRows(const uint8_t* src, size_t bytes, void* dst) { std::memcpy(dst, src, bytes); }

uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

}  // namespace

const char* ExpertMatrixName(ExpertMatrix m) { return kMatrixNames[static_cast<int>(m)]; }

LayerExperts::~LayerExperts() = default;

absl::StatusOr<std::unique_ptr<LayerExperts>> LayerExperts::Open(const std::string& dir,
                                                                 const LayerRequest& want) {
  const std::string manifest_path = absl::StrCat(dir, "/", kManifestName);
  const std::string config_path = absl::StrCat(dir, "/config.json");
  if (!IsFile(manifest_path)) {
    if (!IsFile(config_path)) {
      return absl::NotFoundError(absl::StrCat(dir, ": not a weight folder: neither ", kManifestName,
                                              " (kt convert output) nor config.json (Hugging Face) is there"));
    }
    absl::StatusOr<MoeArch> arch = LoadMoeConfig(dir);
    if (!arch.ok()) return arch.status();
    absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
    if (!ckpt.ok()) return ckpt.status();
    return OpenHf(std::shared_ptr<const Checkpoint>(std::move(*ckpt)), *arch, config_path, want);
  }

  // A converted folder.
  absl::StatusOr<Manifest> m = ReadManifest(dir);
  if (!m.ok()) return m.status();
  if (m->layout != want.method.tag) {
    return absl::InvalidArgumentError(absl::StrCat(
        manifest_path, ": the folder holds layout \"", m->layout, "\" (converted for method ", m->method,
        "), but method ", want.method.method, " needs \"", want.method.tag, "\"; convert again with --method ",
        want.method.method));
  }
  if (absl::Status s = CheckShape(manifest_path, "num_experts", "hidden", "intermediate", m->num_experts,
                                  m->hidden, m->intermediate, want);
      !s.ok())
    return s;
  const ManifestLayer* entry = m->Find(want.layer);
  if (entry == nullptr) {
    std::vector<int> have;
    for (const ManifestLayer& l : m->layers) have.push_back(l.layer);
    return absl::NotFoundError(absl::StrCat(manifest_path, ": layer ", want.layer,
                                            " is not a converted MoE layer (the folder has layers [",
                                            absl::StrJoin(have, ", "), "])"));
  }
  std::unique_ptr<LayerExperts> le(new LayerExperts());
  le->converted_ = true;
  le->layer_ = want.layer;
  le->e_ = m->num_experts;
  le->h_ = m->hidden;
  le->i_ = m->intermediate;
  le->layout_ = want.method;
  le->entry_ = *entry;
  const int64_t expect_shapes[3][2] = {{le->i_, le->h_}, {le->i_, le->h_}, {le->h_, le->i_}};
  for (int p = 0; p < 3; ++p) {
    if (entry->shapes[p][0] != expect_shapes[p][0] || entry->shapes[p][1] != expect_shapes[p][1]) {
      return absl::InvalidArgumentError(absl::StrCat(
          manifest_path, ": layer ", want.layer, " ", kMatrixNames[p], " is [", entry->shapes[p][0], ", ",
          entry->shapes[p][1], "], expected [", expect_shapes[p][0], ", ", expect_shapes[p][1], "]"));
    }
  }
  const std::string path = absl::StrCat(dir, "/", entry->file);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
  if (!file.ok()) return file.status();
  if ((*file)->file_size() != entry->bytes) {
    return absl::DataLossError(absl::StrCat(path, ": ", (*file)->file_size(), " bytes, the manifest says ",
                                            entry->bytes, " (a truncated or replaced file)"));
  }
  le->file_ = std::move(*file);
  const auto meta = le->file_->metadata().find("layout");
  if (meta == le->file_->metadata().end() || meta->second != m->layout) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": __metadata__.layout is not \"", m->layout,
                                                   "\" as the manifest says"));
  }
  if (absl::Status st = le->FindConvertedTensors(path); !st.ok()) return st;
  return le;
}

// Every expert's tensors in the converted layer file, with the dtypes and shapes of the layout.
absl::Status LayerExperts::FindConvertedTensors(const std::string& path) {
  tensors_.assign(static_cast<size_t>(e_) * 9, nullptr);
  const MethodLayout& ml = layout_;
  const int64_t expect_shapes[3][2] = {{i_, h_}, {i_, h_}, {h_, i_}};
  for (int e = 0; e < e_; ++e) {
    for (int p = 0; p < 3; ++p) {
      const int64_t n = expect_shapes[p][0], k = expect_shapes[p][1];
      struct Part {
        const char* part;
        Dtype dtype;
        std::vector<int64_t> shape;
      };
      std::vector<Part> parts;
      if (!ml.quantized) {
        parts.push_back({"weight", Dtype::kBf16, {n, k}});
      } else {
        parts.push_back({"qdata", Dtype::kU8, {n, static_cast<int64_t>(QuantizedRowBytes(ml.spec, k))}});
        parts.push_back({"scales", Dtype::kF32, {n, static_cast<int64_t>(ScalesPerRow(ml.spec, k))}});
        if (IsAsymFormat(ml.spec.format)) {
          parts.push_back({"zeros", Dtype::kU8, {n, static_cast<int64_t>(ScalesPerRow(ml.spec, k))}});
        }
      }
      for (size_t q = 0; q < parts.size(); ++q) {
        const std::string name = ConvertedTensorName(e, kMatrixNames[p], parts[q].part);
        const TensorInfo* t = file_->Find(name);
        if (t == nullptr) {
          return absl::NotFoundError(absl::StrCat(path, ": tensor \"", name, "\" is missing (expected ",
                                                  DtypeName(parts[q].dtype), " ", ShapeString(parts[q].shape),
                                                  ")"));
        }
        absl::StatusOr<const TensorInfo*> ok = file_->Expect(name, parts[q].dtype, parts[q].shape);
        if (!ok.ok()) return ok.status();
        tensors_[(static_cast<size_t>(e) * 3 + p) * 3 + q] = t;
        weight_bytes_ += t->num_bytes();
      }
    }
  }
  return absl::OkStatus();
}

MoeArch ResolveExpertLayout(const MoeArch& arch, const Checkpoint& ckpt, int layer) {
  if (!arch.fused_experts()) return arch;
  absl::StatusOr<FusedExpertNames> fused = FusedExpertTensorNames(arch, layer);
  if (!fused.ok()) return arch;  // Reported when the layer is opened.
  const Checkpoint::Located down = ckpt.Find(fused->down);
  if (ckpt.Find(fused->gate_up).info == nullptr) {
    if (arch.family != MoeFamily::kQwen35Moe) return arch;
    MoeArch per_expert = arch;
    per_expert.layout = ExpertLayout::kPerExpert;
    absl::StatusOr<ExpertNames> first = ExpertTensorNames(per_expert, layer, 0);
    if (!first.ok() || ckpt.Find(first->gate).info == nullptr) return arch;  // The fused name is the error.
    return per_expert;
  }
  // down_proj is [E, H, I] in the out-in order and [E, I, H] in the in-out one; when H == I the shapes
  // cannot tell, and the config's layout stands.
  if (down.info == nullptr || arch.hidden == arch.intermediate) return arch;
  const std::vector<int64_t> out_in = {arch.num_experts, arch.hidden, arch.intermediate};
  const std::vector<int64_t> in_out = {arch.num_experts, arch.intermediate, arch.hidden};
  MoeArch resolved = arch;
  if (down.info->shape == out_in) resolved.layout = ExpertLayout::kFusedGateUpOutIn;
  if (down.info->shape == in_out) resolved.layout = ExpertLayout::kFusedGateUpInOut;
  return resolved;
}

absl::StatusOr<std::unique_ptr<LayerExperts>> LayerExperts::OpenHfAsRequested(
    std::shared_ptr<const Checkpoint> ckpt, const MoeArch& config_arch, const std::string& config_path,
    const LayerRequest& want) {
  const MoeArch arch = ResolveExpertLayout(config_arch, *ckpt, want.layer);
  // FP8 folders are read as stored (hf_fp8.h), never through a bf16 copy; the folder kind and the method
  // must agree. MX-coded experts likewise (hf_mx.h). Native int4 (compressed-tensors pack-quantized, GPTQ:
  // hf_int4.h) unless the method is FP8_PERCHANNEL, which reads compressed-tensors FP8 (GLM-4.x).
  const absl::StatusOr<bool> mx_or = MxCodedFolder(*ckpt, arch, want, config_path);
  if (!mx_or.ok()) return mx_or.status();
  const bool mx = *mx_or;
  const bool int4 = !mx && arch.quantization.has_value() && IsHfInt4QuantMethod(arch.quantization->quant_method) &&
                    want.method.method != "FP8_PERCHANNEL";
  HfInt4Config int4_config;
  if (int4) {
    absl::StatusOr<HfInt4Config> c = ReadHfInt4Config(config_path);
    if (!c.ok()) {
      if (arch.quantization->quant_method != "compressed-tensors") return c.status();
      return absl::Status(c.status().code(),
                          absl::StrCat(c.status().message(), " (FP8 experts with per-channel `weight_scale`, as "
                                                             "GLM-4.x FP8 ships them: load it with method "
                                                             "FP8_PERCHANNEL)"));
    }
    int4_config = *c;
    if (arch.fused_experts()) {
      return absl::UnimplementedError(absl::StrCat(config_path, ": ", HfInt4Method(c->kind), " checkpoints with "
                                                   "fused expert tensors are not supported (per-expert ones are)"));
    }
  }
  absl::StatusOr<HfFp8Folder> kind =
      (mx || int4) ? HfFp8Folder{} : ClassifyHfFp8Folder(arch, config_path, want.method);
  if (!kind.ok()) return kind.status();
  const bool fp8 = kind->fp8;
  if (absl::Status s = CheckShape(config_path, "num_experts", "hidden_size", "moe_intermediate_size",
                                  arch.num_experts, arch.hidden, arch.intermediate, want);
      !s.ok())
    return s;
  if (!arch.IsMoeLayer(want.layer)) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": layer ", want.layer,
                                                   " is not an MoE layer (MoE layers: [",
                                                   absl::StrJoin(arch.moe_layers, ", "), "] of ",
                                                   arch.num_layers, ")"));
  }
  std::unique_ptr<LayerExperts> le(new LayerExperts());
  le->layer_ = want.layer;
  le->e_ = arch.num_experts;
  le->h_ = arch.hidden;
  le->i_ = arch.intermediate;
  le->layout_ = want.method;
  le->arch_ = arch;
  const int64_t E = le->e_, H = le->h_, I = le->i_;
  if (arch.fused_experts()) {
    absl::StatusOr<FusedExpertNames> names = FusedExpertTensorNames(arch, want.layer);
    if (!names.ok()) return names.status();
    const bool out_in = arch.layout == ExpertLayout::kFusedGateUpOutIn;
    const std::vector<int64_t> gu = out_in ? std::vector<int64_t>{E, 2 * I, H} : std::vector<int64_t>{E, H, 2 * I};
    const std::vector<int64_t> dn = out_in ? std::vector<int64_t>{E, H, I} : std::vector<int64_t>{E, I, H};
    const std::string what = absl::StrCat("layer ", want.layer, " fused experts");
    if (absl::Status s = CheckHfTensor(*ckpt, names->gate_up, gu, &le->fused_[0], what); !s.ok()) return s;
    if (absl::Status s = CheckHfTensor(*ckpt, names->down, dn, &le->fused_[1], what); !s.ok()) return s;
    le->weight_bytes_ = le->fused_[0].info->num_bytes() + le->fused_[1].info->num_bytes();
  } else if (int4) {
    if (absl::Status s = le->OpenHfInt4(*ckpt, int4_config, config_path); !s.ok()) return s;
  } else {
    le->per_expert_.resize(static_cast<size_t>(E) * 3);
    le->hf_fp8_ = fp8;
    le->hf_fp8_scales_ = kind->scales;
    le->hf_mx_ = mx;
    if (fp8 || mx) le->per_expert_scales_.resize(static_cast<size_t>(E) * 3);
    for (int e = 0; e < E; ++e) {
      absl::StatusOr<ExpertNames> names = ExpertTensorNames(arch, want.layer, e);
      if (!names.ok()) return names.status();
      const std::string* n3[3] = {&names->gate, &names->up, &names->down};
      for (int p = 0; p < 3; ++p) {
        const std::vector<int64_t> shape = p == 2 ? std::vector<int64_t>{H, I} : std::vector<int64_t>{I, H};
        const std::string what = absl::StrCat("layer ", want.layer, " expert ", e, " ", kMatrixNames[p]);
        if (mx) {
          if (absl::Status s = CheckHfMxTensors(*ckpt, *n3[p], shape, want.method.spec.format, what,
                                                &le->per_expert_[e * 3 + p], &le->per_expert_scales_[e * 3 + p]);
              !s.ok())
            return s;
          le->weight_bytes_ += le->per_expert_scales_[e * 3 + p].info->num_bytes();
        } else if (fp8) {
          if (absl::Status s = CheckHfFp8Tensors(*ckpt, *n3[p], shape, le->hf_fp8_scales_, what,
                                                 &le->per_expert_[e * 3 + p], &le->per_expert_scales_[e * 3 + p]);
              !s.ok())
            return s;
          le->weight_bytes_ += le->per_expert_scales_[e * 3 + p].info->num_bytes();
        } else if (absl::Status s = CheckHfTensor(*ckpt, *n3[p], shape, &le->per_expert_[e * 3 + p], what);
                   !s.ok()) {
          return s;
        }
        le->weight_bytes_ += le->per_expert_[e * 3 + p].info->num_bytes();
      }
    }
  }
  le->ckpt_ = std::move(ckpt);
  return le;
}

absl::Status LayerExperts::CheckExpert(int expert, const char* fn) const {
  if (expert < 0 || expert >= e_) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": expert = ", expert, " is not in [0, num_experts = ", e_, ")"));
  }
  return absl::OkStatus();
}

size_t LayerExperts::num_verify_tasks() const { return converted_ ? entry_.crc32c.size() : 0; }

absl::Status LayerExperts::Verify(size_t task) const {
  if (task >= num_verify_tasks()) return absl::InvalidArgumentError("Verify: task out of range");
  // The whole file is mapped by SafetensorsFile: checksum the mapping (header and data alike).
  const uint32_t crc = ChunkCrc32c(file_->file_data(), file_->file_size(), task);
  if (crc != entry_.crc32c[task]) {
    const uint64_t begin = static_cast<uint64_t>(task) * kChecksumChunkBytes;
    const uint64_t end = std::min<uint64_t>(file_->file_size(), begin + kChecksumChunkBytes);
    return absl::DataLossError(absl::StrCat(file_->path(), ": checksum mismatch in bytes [", begin, ", ", end,
                                            "): CRC32C ", Crc32cHex(crc), ", the manifest says ",
                                            Crc32cHex(entry_.crc32c[task]),
                                            " (the file is corrupt; convert again)"));
  }
  return absl::OkStatus();
}

const bf16_t* LayerExperts::MappedBf16(int expert, ExpertMatrix m) const {
  if (expert < 0 || expert >= e_ || hf_fp8_ || hf_mx_ || !hf_int4_.empty() || gguf()) return nullptr;
  const int p = static_cast<int>(m);
  const uint8_t* at = nullptr;
  if (converted_) {
    if (layout_.quantized) return nullptr;
    const TensorInfo* t = tensors_[(static_cast<size_t>(expert) * 3 + p) * 3];
    at = file_->data(*t);
  } else if (!arch_.fused_experts()) {
    const Checkpoint::Located& loc = per_expert_[static_cast<size_t>(expert) * 3 + p];
    at = loc.file->data(*loc.info);
  } else if (arch_.layout == ExpertLayout::kFusedGateUpOutIn) {
    const size_t I = i_, H = h_;
    const Checkpoint::Located& loc = fused_[m == ExpertMatrix::kDown ? 1 : 0];
    const uint8_t* base = loc.file->data(*loc.info);
    at = m == ExpertMatrix::kDown
             ? base + static_cast<size_t>(expert) * H * I * 2
             : base + (static_cast<size_t>(expert) * 2 * I + (m == ExpertMatrix::kUp ? I : 0)) * H * 2;
  } else {
    return nullptr;
  }
  // Safetensors data offsets are only byte offsets: typed access needs 2-byte alignment.
  if (reinterpret_cast<uintptr_t>(at) % alignof(bf16_t) != 0) return nullptr;
  return reinterpret_cast<const bf16_t*>(at);
}

absl::Status LayerExperts::ReadBf16(int expert, ExpertMatrix m, bf16_t* out) const {
  if (absl::Status s = CheckExpert(expert, "ReadBf16"); !s.ok()) return s;
  if (hf_dequantize_) return ReadDequantizedBf16(expert, m, out);
  if (gguf()) return ReadGgufBf16(expert, m, out);
  const int p = static_cast<int>(m);
  const size_t n = Rows(m), k = Cols(m);
  if (hf_fp8_ || hf_mx_) {
    return absl::FailedPreconditionError(absl::StrCat(ckpt_->dir(), " is ", hf_mx_ ? "MX" : "FP8", " (",
                                                      layout_.tag, "): read it with ReadQuantized"));
  }
  if (!hf_int4_.empty()) return ReadHfInt4Bf16(expert, m, out);
  if (converted_) {
    if (layout_.quantized) {
      return absl::FailedPreconditionError(absl::StrCat(file_->path(), " is quantized (", layout_.tag,
                                                        "): read it with ReadQuantized"));
    }
    const TensorInfo* t = tensors_[(static_cast<size_t>(expert) * 3 + p) * 3];
    CopyRows(file_->data(*t), t->num_bytes(), out);
    return absl::OkStatus();
  }
  if (!arch_.fused_experts()) {
    const Checkpoint::Located& loc = per_expert_[static_cast<size_t>(expert) * 3 + p];
    CopyRows(loc.file->data(*loc.info), loc.info->num_bytes(), out);
    return absl::OkStatus();
  }
  const size_t I = i_, H = h_;
  const bool out_in = arch_.layout == ExpertLayout::kFusedGateUpOutIn;
  const Checkpoint::Located& loc = fused_[m == ExpertMatrix::kDown ? 1 : 0];
  const uint8_t* base = loc.file->data(*loc.info);
  if (out_in) {
    // gate_up [E, 2I, H]: gate rows [0, I), up rows [I, 2I); down [E, H, I] as is.
    if (m == ExpertMatrix::kDown) {
      CopyRows(base + static_cast<size_t>(expert) * H * I * 2, H * I * 2, out);
    } else {
      CopyRows(base + (static_cast<size_t>(expert) * 2 * I + (m == ExpertMatrix::kUp ? I : 0)) * H * 2,
               I * H * 2, out);
    }
    return absl::OkStatus();
  }
  // In-out: gate_up [E, H, 2I] (gate columns [0, I), up [I, 2I)), down [E, I, H]: transpose into [N, K].
  if (m == ExpertMatrix::kDown) {
    const uint8_t* d = base + static_cast<size_t>(expert) * I * H * 2;
    for (size_t i = 0; i < I; ++i)
      for (size_t h = 0; h < H; ++h) out[h * I + i].bits = LoadU16(d + (i * H + h) * 2);
  } else {
    const size_t col0 = m == ExpertMatrix::kUp ? I : 0;
    const uint8_t* g = base + static_cast<size_t>(expert) * H * 2 * I * 2;
    for (size_t h = 0; h < H; ++h)
      for (size_t i = 0; i < I; ++i) out[i * H + h].bits = LoadU16(g + (h * 2 * I + col0 + i) * 2);
  }
  (void)n;
  (void)k;
  return absl::OkStatus();
}

absl::Status LayerExperts::ReadQuantized(int expert, ExpertMatrix m, QuantizedMatrix* out) const {
  if (absl::Status s = CheckExpert(expert, "ReadQuantized"); !s.ok()) return s;
  if (!quantized()) {
    return absl::FailedPreconditionError("ReadQuantized: the folder holds bf16 weights: read them with ReadBf16");
  }
  const int p = static_cast<int>(m);
  if (!hf_int4_.empty()) {
    return ReadHfInt4Matrix(hf_int4_config_, hf_int4_[static_cast<size_t>(expert) * 3 + p], Rows(m), Cols(m),
                            hf_int4_group_, out);
  }
  if (hf_mx_) {
    ReadHfMx(per_expert_[static_cast<size_t>(expert) * 3 + p], per_expert_scales_[static_cast<size_t>(expert) * 3 + p],
             layout_.spec.format, Rows(m), Cols(m), out);
    return absl::OkStatus();
  }
  if (hf_fp8_) {
    // The codes as stored; the scales repeated per row (and per 128-k block) as the canonical form has them.
    ReadHfFp8(per_expert_[static_cast<size_t>(expert) * 3 + p], per_expert_scales_[static_cast<size_t>(expert) * 3 + p],
              hf_fp8_scales_, Rows(m), Cols(m), out);
    return absl::OkStatus();
  }
  const TensorInfo* const* t = &tensors_[(static_cast<size_t>(expert) * 3 + p) * 3];
  out->spec = layout_.spec;
  out->n = Rows(m);
  out->k = Cols(m);
  out->data.resize(t[0]->num_bytes());
  std::memcpy(out->data.data(), file_->data(*t[0]), t[0]->num_bytes());
  out->scales.resize(t[1]->num_bytes() / 4);
  std::memcpy(out->scales.data(), file_->data(*t[1]), t[1]->num_bytes());
  if (t[2] != nullptr) {
    out->zeros.resize(t[2]->num_bytes());
    std::memcpy(out->zeros.data(), file_->data(*t[2]), t[2]->num_bytes());
    for (size_t i = 0; i < out->zeros.size(); ++i) {
      if (out->zeros[i] > 15) {
        return absl::DataLossError(absl::StrCat(file_->path(), ": tensor \"", t[2]->name, "\" element ", i,
                                                " is ", out->zeros[i], ", a zero point must be in [0, 15]"));
      }
    }
  } else {
    out->zeros.clear();
  }
  return absl::OkStatus();
}

std::vector<Checkpoint::Located> LayerExperts::SourceTensors() const {
  if (converted_ || gguf()) return {};
  if (arch_.fused_experts()) return {fused_[0], fused_[1]};
  if (!hf_int4_.empty()) {
    std::vector<Checkpoint::Located> all;
    for (const HfInt4Matrix& mat : hf_int4_) {
      for (const Checkpoint::Located& t : {mat.packed, mat.scale, mat.zeros, mat.g_idx, mat.shape}) {
        if (t.info != nullptr) all.push_back(t);
      }
    }
    return all;
  }
  if (hf_fp8_ || hf_mx_) {
    std::vector<Checkpoint::Located> all = per_expert_;
    all.insert(all.end(), per_expert_scales_.begin(), per_expert_scales_.end());
    return all;
  }
  return per_expert_;
}

std::vector<LayerExperts::SourceBytes> LayerExperts::SourceSpans() const {
  std::vector<SourceBytes> out;
  if (gguf()) {
    for (const GgufExpertTensor& t : gguf_tensors_) {
      out.push_back({t.name, t.file, t.data, t.expert_bytes * t.experts});
    }
    return out;
  }
  for (const Checkpoint::Located& loc : SourceTensors()) {
    out.push_back({loc.info->name, loc.file->path(), loc.file->data(*loc.info), loc.info->num_bytes()});
  }
  return out;
}

void LayerExperts::DropPages(int expert) const {
  if (expert < 0 || expert >= e_) return;
  if (gguf()) {
    for (const GgufExpertTensor& t : gguf_tensors_) {
      DropMappedPages(t.data + t.expert_bytes * static_cast<uint64_t>(expert), t.expert_bytes);
    }
    return;
  }
  if (converted_) {
    for (int q = 0; q < 9; ++q) {
      const TensorInfo* t = tensors_[static_cast<size_t>(expert) * 9 + q];
      if (t != nullptr) DropMappedPages(file_->data(*t), t->num_bytes());
    }
    return;
  }
  if (!arch_.fused_experts()) {
    for (int p = 0; p < 3; ++p) {
      const Checkpoint::Located& loc = per_expert_[static_cast<size_t>(expert) * 3 + p];
      DropMappedPages(loc.file->data(*loc.info), loc.info->num_bytes());
      if (hf_fp8_ || hf_mx_) {
        const Checkpoint::Located& sc = per_expert_scales_[static_cast<size_t>(expert) * 3 + p];
        DropMappedPages(sc.file->data(*sc.info), sc.info->num_bytes());
      }
    }
    return;
  }
  for (const Checkpoint::Located& loc : fused_) {
    const uint64_t per = loc.info->num_bytes() / static_cast<uint64_t>(e_);
    DropMappedPages(loc.file->data(*loc.info) + per * static_cast<uint64_t>(expert), per);
  }
}

}  // namespace kt
