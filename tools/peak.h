// Measures the peak arithmetic rate of a kernel path's core instruction on all threads, the yardstick
// beside which `kt bench` prints prefill TFLOPS. Each thread runs a loop of independent instructions
// (enough accumulator chains to cover latency x throughput), nothing else: no loads, no stores.
//
//   path          instruction                    FLOP per instruction
//   amx           tdpbf16ps 16x16x32         16384: 16 x 16 outputs x 32 products x (mul + add)
//   avx512_bf16   vdpbf16ps zmm                  64: 16 fp32 lanes x 2 bf16 products x (mul + add)
//   avx512(_vnni) vfmadd231ps zmm                32: 16 lanes x (mul + add)
//   avx2          vfmadd231ps ymm                16:  8 lanes x (mul + add)
//   scalar        mulss + addss (x86-64 base)     2
// and, for the integer kernels (PeakOperands::kInt8, rates in int8 ops: a multiply-add counts 2), the
// instructions listed in peak_int8.cc and tdpbssd 16x16x64 (32768 ops) on amx.
#ifndef KT_TOOLS_PEAK_H_
#define KT_TOOLS_PEAK_H_

#include <cstdint>
#include <string>

#include "kt/kernels/cpu_features.h"

namespace kt {
namespace tools {

struct PeakResult {
  double flops_per_second = 0;  // Best repetition, all threads together.
  std::string instruction;      // e.g. "vdpbf16ps zmm".
  int flop_per_instruction = 0;
  int chains = 0;  // Independent accumulators per thread.
  int threads = 0;
  int reps = 0;
};

// The instruction family of the yardstick: the bf16/fp32 kernels' or the int8 kernels'.
enum class PeakOperands { kFloat, kInt8 };

// `isa` must be supported by this CPU. Calibrates the loop to about `seconds_per_rep` on one thread, then
// runs `reps` repetitions on `threads` threads released together and keeps the fastest.
PeakResult MeasurePeak(Isa isa, int threads, bool pin, double seconds_per_rep, int reps,
                       PeakOperands operands = PeakOperands::kFloat);

namespace internal {

// One loop per instruction set, each in a translation unit compiled with exactly the flags it needs.
// Runs `iters` iterations of `chains` independent instructions and returns a value computed from every
// accumulator (so that nothing is optimised away).
struct PeakLoop {
  float (*run)(int64_t iters);
  const char* instruction;
  int flop_per_instruction;
  int chains;
};
PeakLoop PeakLoopAmxBf16();
PeakLoop PeakLoopAvx512Bf16();
PeakLoop PeakLoopAvx512Fma();
PeakLoop PeakLoopAvx2Fma();
PeakLoop PeakLoopScalar();
PeakLoop PeakLoopAmxInt8();
PeakLoop PeakLoopAvx512Vnni();
PeakLoop PeakLoopAvx512Maddwd();
PeakLoop PeakLoopAvx2Maddwd();
PeakLoop PeakLoopScalarInt();

}  // namespace internal
}  // namespace tools
}  // namespace kt

#endif  // KT_TOOLS_PEAK_H_
