#include "kt/moe/tp_layer.h"

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kt {

absl::StatusOr<std::unique_ptr<TpMoeLayer>> TpMoeLayer::Create(const MoeConfig& config, Isa isa,
                                                               ExpertFormat format, int tp) {
  if (absl::Status s = ValidateMoeConfig(config); !s.ok()) return s;
  if (tp < 1 || config.intermediate % tp != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor parallelism: tp (threadpool_count) = ", tp, " must be >= 1 and divide moe_intermediate_size = ",
        config.intermediate));
  }
  std::unique_ptr<TpMoeLayer> l(new TpMoeLayer(config));
  MoeConfig part = config;
  part.intermediate = config.intermediate / tp;
  for (int p = 0; p < tp; ++p) {
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

absl::Status TpMoeLayer::LoadWeights(const bf16_t* gate, const bf16_t* up, const bf16_t* down,
                                     const int64_t* physical_to_logical, const std::vector<ThreadPool*>& pools) {
  if (absl::Status s = CheckPools("LoadWeights", pools); !s.ok()) return s;
  if (parts_.size() == 1) return parts_[0]->LoadWeights(gate, up, down, physical_to_logical, *pools[0]);
  const size_t e_count = config_.num_experts, h = config_.hidden, inter = config_.intermediate;
  const size_t ip = inter / parts_.size();
  // Part p's canonical slices, [E, ip, H] and [E, H, ip]; packed by its own pool (first touch on its node).
  std::vector<bf16_t> g(e_count * ip * h), u(e_count * ip * h), d(e_count * h * ip);
  for (size_t p = 0; p < parts_.size(); ++p) {
    for (size_t e = 0; e < e_count; ++e) {
      const size_t src = (e * inter + p * ip) * h;
      std::copy_n(gate + src, ip * h, g.begin() + e * ip * h);
      std::copy_n(up + src, ip * h, u.begin() + e * ip * h);
      for (size_t r = 0; r < h; ++r) {
        std::copy_n(down + (e * h + r) * inter + p * ip, ip, d.begin() + (e * h + r) * ip);
      }
    }
    if (absl::Status s = parts_[p]->LoadWeights(g.data(), u.data(), d.data(), physical_to_logical, *pools[p]);
        !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("tensor-parallel part ", p, ": ", s.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status TpMoeLayer::Forward(const std::vector<ThreadPool*>& pools, int qlen, int k, const int64_t* ids,
                                 const float* weights, const bf16_t* input, const MoeLayer::Output& output,
                                 const bool* gpu_experts_mask) {
  if (absl::Status s = CheckPools("Forward", pools); !s.ok()) return s;
  if (parts_.size() == 1) {
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
  // Parts 1.. on their own threads, part 0 on this one.
  std::vector<absl::Status> status(parts_.size());
  auto run = [&](size_t p) {
    MoeLayer::Output partial;
    partial.f32 = partials_[p].data();
    status[p] = parts_[p]->Forward(*pools[p], qlen, k, ids, weights, input, partial, gpu_experts_mask);
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
