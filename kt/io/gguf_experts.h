// The routed experts of a GGUF checkpoint (method LLAMAFILE): llama.cpp's expert-stacked tensors
// blk.L.ffn_gate_exps.weight and blk.L.ffn_up_exps.weight (ne = [H, I, E]: per expert I rows of H values)
// and blk.L.ffn_down_exps.weight (ne = [I, H, E]), read from one .gguf file, a split set
// (<prefix>-00001-of-00003.gguf ...: any part opens all of them) or a folder of .gguf files, memory-mapped:
// an expert's bytes are the file's ggml blocks, handed on as they are.
//
// Errors name the checkpoint, the tensor, the layer (and experts) and, for shapes, the dimension: a missing
// tensor lists the layer's tensors that do exist; a type LLAMAFILE does not run names the tensor and lists
// the supported types; ne[0] / ne[1] / ne[2] are compared with hidden / intermediate / num_experts by name.
#ifndef KT_IO_GGUF_EXPERTS_H_
#define KT_IO_GGUF_EXPERTS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kt/io/gguf.h"

namespace kt {

class GgufCheckpoint {
 public:
  // `path`: a .gguf file (a part of a split set opens every part), or a folder whose .gguf files are opened
  // (one model: a tensor name in two files is an error naming both).
  static absl::StatusOr<std::unique_ptr<GgufCheckpoint>> Open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<std::unique_ptr<GgufFile>>& files() const { return files_; }
  // The tensor called `name` and its file; {nullptr, nullptr} if no file has it.
  std::pair<const GgufFile*, const GgufTensorInfo*> Find(const std::string& name) const;

 private:
  std::string path_;
  std::vector<std::unique_ptr<GgufFile>> files_;
};

// One projection of a layer's experts: E experts of N rows of K values, expert e's bytes at
// data + e * expert_bytes.
struct GgufExpertTensor {
  std::string name;
  std::string file;
  int type_id = -1;  // the ggml type (kt/kernels/gguf_quants.h GgufType)
  uint64_t experts = 0, n = 0, k = 0;
  uint64_t expert_bytes = 0;
  const uint8_t* data = nullptr;
};

// "gate", "up" or "down" (proj 0, 1, 2) of layer `layer`: blk.{layer}.ffn_{proj}_exps.weight, checked to
// be 3-D with ne[0] = K, ne[1] = N (gate/up: hidden, intermediate; down: intermediate, hidden) and
// ne[2] = num_experts, of a type LLAMAFILE runs.
absl::StatusOr<GgufExpertTensor> FindGgufExperts(const GgufCheckpoint& ckpt, int layer, int proj,
                                                 uint64_t num_experts, uint64_t hidden, uint64_t intermediate);

}  // namespace kt

#endif  // KT_IO_GGUF_EXPERTS_H_
