#include "kernels/calib.h"

#include <algorithm>
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

namespace {

// (count of zeros, smoothing shift for the nonzero entries) of one distribution; false if all zero.
bool smoothing(std::size_t zeros, std::size_t n, double* shift) noexcept {
    const std::size_t nonzero = n - zeros;
    if (nonzero == 0) return false;
    *shift = -1e-4 * static_cast<double>(zeros) / static_cast<double>(nonzero);
    return true;
}

}  // namespace

double entropy_kl(const std::uint64_t* bins, std::size_t i, std::size_t m, double tail, double* scratch) noexcept {
    double* level = scratch;      // [m] sum of the bins of each level
    double* norm = scratch + m;   // [m] nonzero bins of each level
    const std::size_t merged = i / m;
    auto group = [&](std::size_t j) { return std::min(j / merged, m - 1); };
    auto p_at = [&](std::size_t j) { return static_cast<double>(bins[j]) + (j + 1 == i ? tail : 0.0); };
    for (std::size_t g = 0; g < m; ++g) level[g] = norm[g] = 0.0;
    std::size_t p_zeros = 0;
    for (std::size_t j = 0; j < i; ++j) {
        const std::size_t g = group(j);
        level[g] += static_cast<double>(bins[j]);
        if (p_at(j) != 0.0) norm[g] += 1.0; else ++p_zeros;
    }
    std::size_t q_zeros = 0;
    for (std::size_t j = 0; j < i; ++j) {  // Q is zero where P is, and where a level's bins sum to 0
        if (p_at(j) == 0.0 || level[group(j)] == 0.0) ++q_zeros;
    }
    double p_shift, q_shift;
    if (!smoothing(p_zeros, i, &p_shift) || !smoothing(q_zeros, i, &q_shift)) return INFINITY;
    // normalize by the sums of the smoothed values themselves, as the twin does
    double ps = 0.0, qs = 0.0;
    for (std::size_t j = 0; j < i; ++j) {
        const double p = p_at(j);
        const std::size_t g = group(j);
        const double q = p != 0.0 ? level[g] / std::max(norm[g], 1.0) : 0.0;
        const double sp = p == 0.0 ? 1e-4 : p + p_shift;
        const double sq = q == 0.0 ? 1e-4 : q + q_shift;
        if (!(sp > 0.0) || !(sq > 0.0)) return INFINITY;
        ps += sp;
        qs += sq;
    }
    double kl = 0.0;
    for (std::size_t j = 0; j < i; ++j) {
        const double p = p_at(j);
        const std::size_t g = group(j);
        const double q = p != 0.0 ? level[g] / std::max(norm[g], 1.0) : 0.0;
        const double sp = (p == 0.0 ? 1e-4 : p + p_shift) / ps;
        const double sq = (q == 0.0 ? 1e-4 : q + q_shift) / qs;
        kl += sp * std::log(sp / sq);
    }
    return kl;
}

}  // namespace kiln
