// `kt convert`: a Hugging Face bf16 checkpoint -> kt's converted folder (manifest.h) for one method.
// Also from Hugging Face folders stored quantized (FP8, MX, native int4) and from GGUF checkpoints (a .gguf
// file, a part of a split set, or a folder of .gguf files): llama.cpp's expert-stacked tensors of the types
// gguf_quants.h lists, each matrix dequantized (ggml's formula in fp32, one rounding to bf16) and quantized by
// the method, the model's shape from the metadata (gguf_arch.h), whose config.json equivalent the output gets.
// Method LLAMAFILE runs GGUF as stored: converting for it is refused, saying so.
//
// Streaming: one MoE layer at a time. Its expert tensors are read through the checkpoint's memory maps
// expert by expert (quantized on `threads` threads), and each expert's mapped pages are dropped from the
// resident set once read, so the peak RSS is about one layer's output (held until its file is written) plus
// the pages of the experts being read, plus ~tens of MB: within "one layer's input + output + 1 GiB".
//
// Atomic and resumable: each layer file is written to a temporary name and renamed (file_util.h); then its
// record goes to layer_LLLL.safetensors.done, also atomically: the layout, the manifest entry (size, shapes,
// chunk CRC32Cs) and the source it was made from (identity of the source files: size, device, inode,
// mtime, ctime; and each source tensor's CRC32C). A rerun keeps a layer only when its record has this
// layout and these shapes, its file still has that size and those checksums, and the source is the same:
// the files' identity unchanged, or else every source tensor's CRC32C unchanged. Anything else is converted
// again, saying why. kt_manifest.json is written last, so a folder without it is never taken for a finished
// conversion.
//
// One writer per output folder: the folder is locked (flock) for the whole run, so a concurrent convert
// into it fails at once. Under the lock, leftover temporaries ("*.tmp.<pid>") of an interrupted run are
// removed (one progress line says which). An output folder holding a conversion for another layout is an
// error, never silently replaced. A group size for a method without groups is refused. A native int4 input
// (compressed-tensors pack-quantized, GPTQ: hf_int4.h) converts to RAWINT4 / GPTQ_INT4 (or AMXINT4_KGroup at
// its group size) as stored, exactly, and to any other method through its dequantized bf16 (q * scale).
//
// The output does not depend on the machine: no NUMA split (kt slices at load time), deterministic
// quantization, tensors in name order.
#ifndef KT_IO_CONVERT_H_
#define KT_IO_CONVERT_H_

#include <cstdint>
#include <cstdio>
#include <string>

#include "absl/status/statusor.h"

namespace kt {

struct ConvertOptions {
  std::string input;   // Hugging Face folder (config.json + safetensors), or a GGUF checkpoint.
  std::string output;  // Created if missing.
  std::string method;  // method.h: BF16, AMXINT8, MOE_INT8, AMXINT4, ...
  int group_size = 0;    // The k-group methods only (0: 128); any other method refuses a non-zero value.
  int threads = 0;       // 0: the CPUs this process may run on.
  std::FILE* progress = stderr;  // One line per layer; nullptr for none.
};

struct ConvertStats {
  int layers_total = 0;      // MoE layers of the model.
  int layers_converted = 0;  // Written by this run.
  int layers_skipped = 0;    // Verified and kept from an earlier run.
  int temporaries_removed = 0;  // Unfinished files of an interrupted run, removed at the start.
  uint64_t bytes_read = 0;   // Expert weight bytes read by this run.
  uint64_t bytes_written = 0;
  double seconds = 0;
};

absl::StatusOr<ConvertStats> ConvertCheckpoint(const ConvertOptions& options);

}  // namespace kt

#endif  // KT_IO_CONVERT_H_
