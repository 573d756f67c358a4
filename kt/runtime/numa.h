// NUMA placement through Debian's libnuma (libnuma-dev): how many nodes there are, which CPUs a node has,
// binding memory to a node, and the per-node worker pools of a tensor-parallel layer (kt/moe/tp_layer.h).
//
// No silent fallback: where NUMA is unavailable (numa_available() < 0: no kernel support, or a container
// without it), pools asked for on explicit nodes are an error naming `numa_nodes`; only pools the user did
// not place stay unpinned.
#ifndef KT_RUNTIME_NUMA_H_
#define KT_RUNTIME_NUMA_H_

#include <cstddef>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

// numa_available() >= 0.
bool NumaAvailable();
// Configured nodes (numa_max_node() + 1); 0 where NUMA is unavailable.
int NumaNodeCount();
// The CPUs of `node` this process may run on (the node's CPUs intersected with the process's affinity), in
// order. InvalidArgument for a node that does not exist (or NUMA unavailable); FailedPrecondition when the
// process may run on none of its CPUs.
absl::StatusOr<std::vector<int>> NumaNodeCpus(int node);
// Sets policy MPOL_BIND to `node` on the pages of [p, p + bytes) (p page aligned), moving pages already
// touched (MPOL_MF_MOVE). InvalidArgument for a bad node or NUMA unavailable; Internal if mbind fails.
absl::Status BindMemoryToNode(void* p, size_t bytes, int node);
// The node the page holding `p` is on (get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)); touch it first.
absl::StatusOr<int> NodeOfAddress(const void* p);

// The worker pools of a tensor-parallel layer: part i's threads on node nodes[i].
struct NodePools {
  std::vector<std::unique_ptr<ThreadPool>> pools;
  std::vector<int> nodes;  // per part: its node, or -1 (not placed: NUMA unavailable and none asked for)
  std::vector<ThreadPool*> raw() const;
};

// `parts` pools sharing `total_threads` threads (part i gets total / parts, the first total % parts one
// more). numa_nodes: one node per part, or empty for the default, node i mod NumaNodeCount(). A placed pool's
// workers (and the thread that runs its part) are pinned to the node's CPUs (ThreadPoolOptions::cpu_set).
// InvalidArgument, naming the argument and what was expected, for parts < 1, total_threads < parts
// (cpuinfer_threads), numa_nodes of another length, a node that does not exist, or numa_nodes given where
// NUMA is unavailable. Empty numa_nodes without NUMA: unpinned pools, nodes -1.
absl::StatusOr<NodePools> CreateNodePools(int parts, int total_threads, const std::vector<int>& numa_nodes);

}  // namespace kt

#endif  // KT_RUNTIME_NUMA_H_
