#include "kernels/calib.h"

#include <cmath>

namespace kiln {

void minmax_update(const float* x, std::size_t n, float* lo, float* hi, std::int64_t* nan_count) noexcept {
    float mn = *lo, mx = *hi;
    std::int64_t nans = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const float v = x[i];
        if (v != v) {
            ++nans;
            continue;
        }
        if (v < mn) mn = v;  // strict: the first of equal values stays (keeps -0 / +0 order-defined)
        if (v > mx) mx = v;
    }
    *lo = mn;
    *hi = mx;
    *nan_count += nans;
}

void abs_histogram_accumulate(const float* x, std::size_t n, float range, std::uint64_t* bins,
                              std::size_t nbins) noexcept {
    const float fbins = static_cast<float>(nbins);
    const std::size_t last = nbins - 1;
    for (std::size_t i = 0; i < n; ++i) {
        const float v = x[i];
        if (v != v) continue;
        const float t = (std::fabs(v) / range) * fbins;  // -ffp-contract=off: two float32 roundings
        // compare before converting: Inf (or a broken precondition) must not reach the cast
        const std::size_t b = t >= fbins ? last : static_cast<std::size_t>(t);
        ++bins[b];
    }
}

}  // namespace kiln
