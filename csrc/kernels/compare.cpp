#include "kernels/compare.h"

#include <cmath>
#include <limits>

namespace kiln {

DiffStats diff_stats_f32(const float* ref, const float* out, std::size_t n, float eps) noexcept {
    float max_abs = 0.0f;
    float max_rel = 0.0f;
    bool abs_nan = false;
    bool rel_nan = false;
    std::int64_t nonfinite = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const float d = std::fabs(out[i] - ref[i]);
        const float a = std::fabs(ref[i]);
        // np.maximum propagates NaN from either side; so must we.
        const float denom = std::isnan(a) ? a : (a < eps ? eps : a);
        const float rel = d / denom;
        abs_nan |= std::isnan(d);
        rel_nan |= std::isnan(rel);
        if (d > max_abs) max_abs = d;
        if (rel > max_rel) max_rel = rel;
        nonfinite += std::isfinite(out[i]) ? 0 : 1;
    }
    const float nan = std::numeric_limits<float>::quiet_NaN();
    return DiffStats{abs_nan ? nan : max_abs, rel_nan ? nan : max_rel, nonfinite};
}

}  // namespace kiln
