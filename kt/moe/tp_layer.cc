#include "kt/moe/tp_layer.h"

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kt {

absl::StatusOr<std::unique_ptr<TpMoeLayer>> TpMoeLayer::Create(const MoeConfig& config, Isa isa,
                                                               ExpertFormat format, int tp,
                                                               const std::vector<int>& numa_nodes) {
  if (absl::Status s = ValidateMoeConfig(config); !s.ok()) return s;
  if (tp < 1 || config.intermediate % tp != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor parallelism: tp (threadpool_count) = ", tp, " must be >= 1 and divide moe_intermediate_size = ",
        config.intermediate));
  }
  if (!numa_nodes.empty() && static_cast<int>(numa_nodes.size()) != tp) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism: numa_nodes has ", numa_nodes.size(),
                                                   " entries, expected one per part (tp = ", tp, ")"));
  }
  const int ip = config.intermediate / tp;
  // Cuts of the quantized forms (SliceQuantized): int4 codes pack two per byte along K, FP8 scales cover 128
  // columns of down.
  if (tp > 1 && format == ExpertFormat::kFp8Block && ip % 128 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor parallelism: tp (threadpool_count) = ", tp, " gives parts of moe_intermediate_size ", ip,
        "; FP8 (128 x 128 block scales) needs a multiple of 128"));
  }
  if (tp > 1 && (format == ExpertFormat::kInt4 || format == ExpertFormat::kInt4Asym) && ip % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism: tp (threadpool_count) = ", tp,
                                                   " gives parts of odd moe_intermediate_size ", ip,
                                                   "; int4 needs an even one"));
  }
  std::unique_ptr<TpMoeLayer> l(new TpMoeLayer(config));
  l->nodes_ = numa_nodes.empty() ? std::vector<int>(tp, -1) : numa_nodes;
  MoeConfig part = config;
  part.intermediate = ip;
  for (int p = 0; p < tp; ++p) {
    part.numa_node = l->nodes_[p];
    // Own scratch per part: parts run at the same time, and a shared scratch serializes Forwards.
    absl::StatusOr<std::unique_ptr<MoeLayer>> layer =
        MoeLayer::Create(part, isa, format, std::make_shared<MoeScratch>());
    if (!layer.ok()) {
      return absl::Status(layer.status().code(),
                          absl::StrCat("tensor parallelism: tp = ", tp, " gives parts of moe_intermediate_size ",
                                       part.intermediate, ", which this format cannot hold: ",
                                       layer.status().message()));
    }
    l->parts_.push_back(std::move(*layer));
  }
  if (tp > 1) {
    l->partials_.assign(tp, std::vector<float>(static_cast<size_t>(config.max_len) * config.hidden));
    // Per-row h scales exchanged between the parts (formats quantizing h per row use it).
    l->h_share_ = std::make_unique<HScaleShare>(tp, static_cast<size_t>(config.max_len) * config.top_k);
    for (auto& p : l->parts_) p->set_h_share(l->h_share_.get());
    l->mask_.reset(new bool[static_cast<size_t>(config.num_experts)]);
  }
  return l;
}

absl::Status TpMoeLayer::CheckPools(const char* fn, const std::vector<ThreadPool*>& pools) const {
  if (pools.size() != parts_.size() || std::count(pools.begin(), pools.end(), nullptr) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("TpMoeLayer::", fn, ": needs one thread pool per part (",
                                                   parts_.size(), "), got ", pools.size()));
  }
  return absl::OkStatus();
}

bool TpMoeLayer::loaded() const {
  for (const auto& p : parts_) {
    if (!p->loaded()) return false;
  }
  return true;
}

size_t TpMoeLayer::weight_bytes() const {
  size_t bytes = 0;
  for (const auto& p : parts_) bytes += p->weight_bytes();
  return bytes;
}

absl::Status TpMoeLayer::LoadWeights(const bf16_t* gate, const bf16_t* up, const bf16_t* down,
                                     const int64_t* physical_to_logical, const std::vector<ThreadPool*>& pools) {
  if (absl::Status s = CheckPools("LoadWeights", pools); !s.ok()) return s;
  if (parts_.size() == 1) return parts_[0]->LoadWeights(gate, up, down, physical_to_logical, *pools[0]);
  const size_t e_count = config_.num_experts, h = config_.hidden, inter = config_.intermediate;
  if (physical_to_logical != nullptr) {
    for (size_t i = 0; i < e_count; ++i) {
      if (physical_to_logical[i] < 0 || physical_to_logical[i] >= static_cast<int64_t>(e_count)) {
        return absl::InvalidArgumentError(absl::StrCat("physical_to_logical[", i, "] = ", physical_to_logical[i],
                                                       " is not in [0, ", e_count, ")"));
      }
    }
  }
  BeginLoad();
  // (slot, projection) tasks on part 0's pool; the parts' memory is bound to their nodes at allocation, so
  // which thread packs a part does not decide where its pages live.
  std::vector<absl::Status> status(e_count * 3);
  pools[0]->ParallelFor(e_count * 3, [&](size_t task, int) {
    const int slot = static_cast<int>(task / 3);
    const auto proj = static_cast<ExpertProj>(task % 3);
    const size_t e = physical_to_logical ? static_cast<size_t>(physical_to_logical[slot]) : slot;
    const bf16_t* src = proj == ExpertProj::kGate ? gate : proj == ExpertProj::kUp ? up : down;
    status[task] = LoadExpert(slot, proj, src + e * inter * h);
  });
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  return FinishLoad();
}

void TpMoeLayer::BeginLoad() {
  for (auto& p : parts_) p->BeginLoad();
}

absl::Status TpMoeLayer::FinishLoad() {
  for (size_t p = 0; p < parts_.size(); ++p) {
    if (absl::Status s = parts_[p]->FinishLoad(); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("tensor-parallel part ", p, ": ", s.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status TpMoeLayer::LoadExpert(int slot, ExpertProj proj, const bf16_t* w) {
  if (parts_.size() == 1) return parts_[0]->LoadExpert(slot, proj, w);
  const size_t h = config_.hidden, inter = config_.intermediate, ip = inter / parts_.size();
  if (format() != ExpertFormat::kBf16) {
    // Quantize the whole matrix (scales of whole rows and groups, as TP = 1 has them), then cut it.
    absl::StatusOr<QuantSpec> spec = quant_spec();
    if (!spec.ok()) return spec.status();
    const size_t n = proj == ExpertProj::kDown ? h : inter, k = proj == ExpertProj::kDown ? inter : h;
    absl::StatusOr<QuantizedMatrix> qm = Quantize(*spec, w, k, n, k);
    if (!qm.ok()) return qm.status();
    return LoadExpertQuantized(slot, proj, *qm);
  }
  std::vector<bf16_t> cut;
  for (size_t p = 0; p < parts_.size(); ++p) {
    const bf16_t* part_w;
    if (proj == ExpertProj::kDown) {  // columns [p ip, (p+1) ip) of [H, I]
      cut.resize(h * ip);
      for (size_t r = 0; r < h; ++r) std::copy_n(w + r * inter + p * ip, ip, cut.begin() + r * ip);
      part_w = cut.data();
    } else {  // rows [p ip, (p+1) ip) of [I, H]: contiguous
      part_w = w + p * ip * h;
    }
    if (absl::Status s = parts_[p]->LoadExpert(slot, proj, part_w); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("tensor-parallel part ", p, ": ", s.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status TpMoeLayer::LoadExpertQuantized(int slot, ExpertProj proj, const QuantizedMatrix& qm) {
  if (parts_.size() == 1) return parts_[0]->LoadExpertQuantized(slot, proj, qm);
  const size_t h = config_.hidden, inter = config_.intermediate, ip = inter / parts_.size();
  const bool down = proj == ExpertProj::kDown;
  if (qm.n != (down ? h : inter) || qm.k != (down ? inter : h)) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpertQuantized: matrix [", qm.n, ", ", qm.k,
                                                   "], expected [", down ? h : inter, ", ", down ? inter : h, "]"));
  }
  QuantizedMatrix cut;
  for (size_t p = 0; p < parts_.size(); ++p) {
    absl::Status s = down ? SliceQuantized(qm, 0, h, p * ip, ip, &cut) : SliceQuantized(qm, p * ip, ip, 0, h, &cut);
    if (s.ok()) s = parts_[p]->LoadExpertQuantized(slot, proj, cut);
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat("tensor-parallel part ", p, ": ", s.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TpMoeLayer>> TpMoeLayer::CreateStaging() const {
  std::unique_ptr<TpMoeLayer> l(new TpMoeLayer(config_));
  l->nodes_ = nodes_;
  l->partials_ = {};  // a staged layer only loads; AdoptWeights swaps parts' weights, not this
  for (const auto& p : parts_) {
    absl::StatusOr<std::unique_ptr<MoeLayer>> staged = p->CreateStaging();
    if (!staged.ok()) return staged.status();
    l->parts_.push_back(std::move(*staged));
  }
  return l;
}

absl::Status TpMoeLayer::AdoptWeights(TpMoeLayer& staged) {
  if (&staged == this || staged.parts_.size() != parts_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("TpMoeLayer::AdoptWeights: the staged layer has ",
                                                   staged.parts_.size(), " parts, this one ", parts_.size()));
  }
  if (!staged.loaded()) return absl::FailedPreconditionError("AdoptWeights: the staged layer is not loaded");
  for (size_t p = 0; p < parts_.size(); ++p) {
    if (absl::Status s = parts_[p]->AdoptWeights(*staged.parts_[p]); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status SliceQuantized(const QuantizedMatrix& qm, size_t r0, size_t rows, size_t k0, size_t cols,
                            QuantizedMatrix* out) {
  if (r0 + rows > qm.n || k0 + cols > qm.k || cols == 0) {
    return absl::InvalidArgumentError(absl::StrCat("SliceQuantized: rows [", r0, ", ", r0 + rows, ") columns [", k0,
                                                   ", ", k0 + cols, ") outside [", qm.n, ", ", qm.k, "]"));
  }
  const QuantSpec& spec = qm.spec;
  const bool nibbles =  // int4, mxfp4: two codes per byte
      spec.format != QuantFormat::kInt8PerChannel && spec.format != QuantFormat::kFp8Block128 &&
      spec.format != QuantFormat::kMxfp8;
  if (nibbles && (k0 % 2 != 0 || (cols % 2 != 0 && k0 + cols != qm.k))) {
    return absl::InvalidArgumentError(absl::StrCat("SliceQuantized: int4 column cut at ", k0, " + ", cols,
                                                   " must be even"));
  }
  const size_t spr = ScalesPerRow(spec, qm.k), out_spr = ScalesPerRow(spec, cols);
  // Columns one scale covers: the whole row (per channel), the group, or FP8's 128.
  const size_t span = spec.format == QuantFormat::kFp8Block128 ? 128
                     : IsMxFormat(spec.format)                ? 32
                     : IsGroupFormat(spec.format)             ? spec.group_size
                                                              : 0;
  size_t s0 = 0;
  if (span != 0) {
    if (k0 % span != 0) {
      return absl::InvalidArgumentError(absl::StrCat("SliceQuantized: column cut at ", k0,
                                                     " is not on a scale boundary (every ", span, " columns)"));
    }
    s0 = k0 / span;
  }
  const size_t rb = QuantizedRowBytes(spec, qm.k), out_rb = QuantizedRowBytes(spec, cols);
  const size_t b0 = nibbles ? k0 / 2 : k0;
  out->spec = spec;
  out->n = rows;
  out->k = cols;
  out->data.resize(rows * out_rb);
  out->scales.resize(rows * out_spr);
  out->zeros.resize(qm.zeros.empty() ? 0 : rows * out_spr);
  for (size_t r = 0; r < rows; ++r) {
    std::copy_n(qm.data.begin() + (r0 + r) * rb + b0, out_rb, out->data.begin() + r * out_rb);
    std::copy_n(qm.scales.begin() + (r0 + r) * spr + s0, out_spr, out->scales.begin() + r * out_spr);
    if (!qm.zeros.empty()) {
      std::copy_n(qm.zeros.begin() + (r0 + r) * spr + s0, out_spr, out->zeros.begin() + r * out_spr);
    }
  }
  return absl::OkStatus();
}

absl::Status TpMoeLayer::Forward(const std::vector<ThreadPool*>& pools, int qlen, int k, const int64_t* ids,
                                 const float* weights, const bf16_t* input, const MoeLayer::Output& output,
                                 const bool* gpu_experts_mask) {
  if (absl::Status s = CheckPools("Forward", pools); !s.ok()) return s;
  if (parts_.size() == 1) {
    ScopedCpuAffinity on_node(pools[0]->cpu_set());  // as each part's driver below
    return parts_[0]->Forward(*pools[0], qlen, k, ids, weights, input, output, gpu_experts_mask);
  }
  if ((output.bf16 == nullptr) == (output.f32 == nullptr) || (output.add && output.bf16 == nullptr)) {
    return absl::InvalidArgumentError(
        "TpMoeLayer::Forward: the output must be exactly one of a bf16 array (optionally added to) or fp32");
  }
  if (qlen < 1 || qlen > config_.max_len) {  // the parts say so too, but partials_ is sized by max_len
    return absl::InvalidArgumentError(
        absl::StrCat("qlen = ", qlen, " must be in [1, max_len = ", config_.max_len, "]"));
  }
  if (k < 1 || k > config_.top_k) {  // the parts say so too; the h-scale share is sized by top_k
    return absl::InvalidArgumentError(absl::StrCat("k = ", k, " must be in [1, top_k = ", config_.top_k, "]"));
  }
  // The parts route the same rows (the h-scale share relies on it): one snapshot of a mask the client may
  // flip in place at any time.
  if (gpu_experts_mask != nullptr) {
    std::copy_n(gpu_experts_mask, config_.num_experts, mask_.get());
    gpu_experts_mask = mask_.get();
  }
  h_share_->Reset(static_cast<size_t>(qlen) * static_cast<size_t>(k));
  // Parts 1.. on their own threads, part 0 on this one.
  std::vector<absl::Status> status(parts_.size());
  auto run = [&](size_t p) {
    // The thread driving part p works in its pool's ParallelFor (as thread 0): keep it on the part's node.
    ScopedCpuAffinity on_node(pools[p]->cpu_set());
    MoeLayer::Output partial;
    partial.f32 = partials_[p].data();
    status[p] = parts_[p]->Forward(*pools[p], qlen, k, ids, weights, input, partial, gpu_experts_mask);
    if (!status[p].ok()) h_share_->Abort();  // the other parts stop waiting for this one's h rows
  };
  std::vector<std::thread> drivers;
  for (size_t p = 1; p < parts_.size(); ++p) drivers.emplace_back(run, p);
  run(0);
  for (auto& t : drivers) t.join();
  for (size_t p = 0; p < parts_.size(); ++p) {
    if (!status[p].ok()) {
      return absl::Status(status[p].code(),
                          absl::StrCat("tensor-parallel part ", p, ": ", status[p].message()));
    }
  }
  // The fp32 reduce, in part order, over row blocks on part 0's pool.
  const size_t h = config_.hidden, rows = static_cast<size_t>(qlen);
  constexpr size_t kRowsPerTask = 4;
  pools[0]->ParallelFor((rows + kRowsPerTask - 1) / kRowsPerTask, [&](size_t task, int) {
    const size_t r1 = std::min(rows, (task + 1) * kRowsPerTask);
    for (size_t i = task * kRowsPerTask * h; i < r1 * h; ++i) {
      float sum = partials_[0][i];
      for (size_t p = 1; p < parts_.size(); ++p) sum += partials_[p][i];
      if (output.f32 != nullptr) {
        output.f32[i] = sum;
      } else if (output.add) {
        output.bf16[i] = F32ToBf16(Bf16ToF32(output.bf16[i]) + sum);
      } else {
        output.bf16[i] = F32ToBf16(sum);
      }
    }
  });
  return absl::OkStatus();
}

}  // namespace kt
