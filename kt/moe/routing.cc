#include "kt/moe/routing.h"

#include <algorithm>

namespace kt {

void RouteToExperts(const int64_t* ids, int qlen, int k, int num_experts, const bool* skip, ExpertRouting* out) {
  ExpertRouting& r = *out;
  const int n = qlen * k;
  auto valid = [&](int64_t id) { return id >= 0 && id < num_experts && !(skip != nullptr && skip[id]); };
  r.count.assign(num_experts, 0);
  for (int t = 0; t < n; ++t) {
    if (valid(ids[t])) ++r.count[ids[t]];
  }
  r.begin.resize(num_experts + 1);
  r.begin[0] = 0;
  r.active.clear();
  for (int e = 0; e < num_experts; ++e) {
    r.begin[e + 1] = r.begin[e] + r.count[e];
    if (r.count[e] > 0) r.active.push_back(e);
  }
  r.rows = r.begin[num_experts];
  if (r.row_slot.size() < static_cast<size_t>(r.rows)) r.row_slot.resize(r.rows);
  if (r.token_slot_row.size() < static_cast<size_t>(n)) r.token_slot_row.resize(n);
  std::vector<int>& fill = r.count;  // reused as the running insert position per expert
  for (int e = 0; e < num_experts; ++e) fill[e] = r.begin[e];
  for (int t = 0; t < n; ++t) {
    r.token_slot_row[t] = -1;
    if (!valid(ids[t])) continue;
    const int row = fill[ids[t]]++;
    r.token_slot_row[t] = row;
    r.row_slot[row] = t;
  }
}

}  // namespace kt
