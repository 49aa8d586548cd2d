// Elementwise comparison of an artifact's output against the reference output.
// Kernel rules (see docs/design.md, "The native module"): raw pointers and sizes in, no allocation, no I/O.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {

struct DiffStats {
    float max_abs;          // max |out - ref|; NaN if any difference is NaN
    float max_rel;          // max |out - ref| / max(|ref|, eps); NaN if any term is NaN
    std::int64_t nonfinite; // number of NaN or +-Inf values in out
};

// Both arrays hold n float32 values. Every step is done in float32 in the same order of
// operations as the numpy twin kiln.native.twins.diff_stats, so the results agree bit for bit
// (max is order-independent; there is no summation).
DiffStats diff_stats_f32(const float* ref, const float* out, std::size_t n, float eps) noexcept;

}  // namespace kiln
