#include "kt/runtime/numa.h"

#include <numa.h>
#include <numaif.h>
#include <sched.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kt {

bool NumaAvailable() { return numa_available() >= 0; }

int NumaNodeCount() { return NumaAvailable() ? numa_max_node() + 1 : 0; }

namespace {

absl::Status CheckNode(int node, const char* what) {
  if (!NumaAvailable()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " asks for NUMA node ", node, ", but NUMA is not available here (numa_available() < 0)"));
  }
  const int count = NumaNodeCount();
  if (node < 0 || node >= count) {
    return absl::InvalidArgumentError(absl::StrCat(what, " = ", node,
                                                   " is not a NUMA node of this machine (its nodes: 0..", count - 1,
                                                   ")"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<int>> NumaNodeCpus(int node) {
  if (absl::Status s = CheckNode(node, "NUMA node"); !s.ok()) return s;
  struct bitmask* mask = numa_allocate_cpumask();
  if (numa_node_to_cpus(node, mask) != 0) {
    numa_free_cpumask(mask);
    return absl::InternalError(absl::StrCat("numa_node_to_cpus(", node, "): ", std::strerror(errno)));
  }
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  const bool have_allowed = sched_getaffinity(0, sizeof(allowed), &allowed) == 0;
  std::vector<int> cpus;
  for (unsigned cpu = 0; cpu < mask->size && cpu < CPU_SETSIZE; ++cpu) {
    if (numa_bitmask_isbitset(mask, cpu) && (!have_allowed || CPU_ISSET(cpu, &allowed))) {
      cpus.push_back(static_cast<int>(cpu));
    }
  }
  numa_free_cpumask(mask);
  if (cpus.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("NUMA node ", node, " has no CPU this process may run on (taskset/cgroup affinity)"));
  }
  return cpus;
}

absl::Status BindMemoryToNode(void* p, size_t bytes, int node) {
  if (absl::Status s = CheckNode(node, "memory node"); !s.ok()) return s;
  if (bytes == 0) return absl::OkStatus();
  // One bit per node; nodes beyond 64 need a longer mask (64 unsigned longs cover 4096 nodes).
  std::vector<unsigned long> mask(64, 0);  // NOLINT(runtime/int): the mbind ABI
  mask[node / (8 * sizeof(unsigned long))] |= 1UL << (node % (8 * sizeof(unsigned long)));
  if (mbind(p, bytes, MPOL_BIND, mask.data(), mask.size() * 8 * sizeof(unsigned long), MPOL_MF_MOVE) != 0) {
    return absl::InternalError(absl::StrCat("mbind(", bytes, " bytes, node ", node, "): ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> NodeOfAddress(const void* p) {
  int node = -1;
  if (get_mempolicy(&node, nullptr, 0, const_cast<void*>(p), MPOL_F_NODE | MPOL_F_ADDR) != 0) {
    return absl::InternalError(absl::StrCat("get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR): ", std::strerror(errno)));
  }
  return node;
}

std::vector<ThreadPool*> NodePools::raw() const {
  std::vector<ThreadPool*> out;
  for (const auto& p : pools) out.push_back(p.get());
  return out;
}

absl::StatusOr<NodePools> CreateNodePools(int parts, int total_threads, const std::vector<int>& numa_nodes) {
  if (parts < 1) {
    return absl::InvalidArgumentError(absl::StrCat("threadpool_count must be >= 1, got ", parts));
  }
  if (total_threads < parts) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cpuinfer_threads = ", total_threads, " is fewer than threadpool_count = ", parts,
        ": each NUMA sub-pool needs at least one thread; pass cpuinfer_threads >= threadpool_count"));
  }
  if (!numa_nodes.empty() && static_cast<int>(numa_nodes.size()) != parts) {
    return absl::InvalidArgumentError(absl::StrCat("numa_nodes must list one node per sub-pool (threadpool_count = ",
                                                   parts, "), got ", numa_nodes.size(), ": [",
                                                   absl::StrJoin(numa_nodes, ", "), "]"));
  }
  NodePools out;
  const int count = NumaNodeCount();
  for (int i = 0; i < parts; ++i) {
    int node = -1;
    if (!numa_nodes.empty()) {
      node = numa_nodes[i];
      if (absl::Status s = CheckNode(node, absl::StrCat("numa_nodes[", i, "]").c_str()); !s.ok()) return s;
    } else if (count > 0) {
      node = i % count;
    }
    ThreadPoolOptions options;
    options.num_threads = total_threads / parts + (i < total_threads % parts ? 1 : 0);
    if (node >= 0) {
      absl::StatusOr<std::vector<int>> cpus = NumaNodeCpus(node);
      if (!cpus.ok()) {
        return absl::Status(cpus.status().code(),
                            absl::StrCat("numa_nodes[", i, "] = ", node, ": ", cpus.status().message()));
      }
      options.cpu_set = std::move(*cpus);
    }
    out.pools.push_back(std::make_unique<ThreadPool>(options));
    out.nodes.push_back(node);
  }
  return out;
}

}  // namespace kt
