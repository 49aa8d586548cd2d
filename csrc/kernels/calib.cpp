#include "kernels/calib.h"

#include <algorithm>
#include <cmath>

#include "kernels/repack.h"  // simd_supported()

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KILN_X86 1
#endif

namespace kiln {

namespace {

void minmax_scalar(const float* x, std::size_t n, float* lo, float* hi, std::int64_t* nan_count) noexcept {
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

#ifdef KILN_X86
// Eight lanes of min / max with NaNs masked to +-Inf and counted. A nonzero min or max is one value
// whichever lane finds it, so it equals the sequential result; only a zero result has a sign that
// depends on order (minps returns the second operand of two zeros), and that is the first zero in x.
// Several times the scalar loop's speed, whose NaN test and strict compares do not vectorize.
float first_zero(const float* x, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) {
        if (x[i] == 0.0f) return x[i];
    }
    return 0.0f;  // not reached: called only when x holds a zero
}

__attribute__((target("avx2"))) void minmax_avx2(const float* x, std::size_t n, float* lo, float* hi,
                                                 std::int64_t* nan_count) noexcept {
    const __m256 pinf = _mm256_set1_ps(INFINITY), ninf = _mm256_set1_ps(-INFINITY);
    __m256 vmn = pinf, vmx = ninf;
    std::int64_t nans = 0;
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        nans += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(nan)));
        vmn = _mm256_min_ps(vmn, _mm256_blendv_ps(v, pinf, nan));
        vmx = _mm256_max_ps(vmx, _mm256_blendv_ps(v, ninf, nan));
    }
    alignas(32) float lmn[8], lmx[8];
    _mm256_store_ps(lmn, vmn);
    _mm256_store_ps(lmx, vmx);
    float mn = INFINITY, mx = -INFINITY;
    for (std::size_t l = 0; l < 8; ++l) {
        mn = std::min(mn, lmn[l]);
        mx = std::max(mx, lmx[l]);
    }
    std::int64_t tail_nans = 0;
    minmax_scalar(x + i, n - i, &mn, &mx, &tail_nans);
    // A zero min (max) is, in index order, the first zero of x: the running value before it was
    // larger (smaller), and later zeros do not replace it under a strict compare.
    if (mn == 0.0f) {
        if (*lo > 0.0f) *lo = first_zero(x, n);
    } else if (mn < *lo) {
        *lo = mn;
    }
    if (mx == 0.0f) {
        if (*hi < 0.0f) *hi = first_zero(x, n);
    } else if (mx > *hi) {
        *hi = mx;
    }
    *nan_count += nans + tail_nans;
}
#endif

}  // namespace

void minmax_update(const float* x, std::size_t n, float* lo, float* hi, std::int64_t* nan_count) noexcept {
#ifdef KILN_X86
    if (simd_supported()) return minmax_avx2(x, n, lo, hi, nan_count);
#endif
    minmax_scalar(x, n, lo, hi, nan_count);
}

namespace {

// NaN -> slot nbins of its lane (dropped by the caller); compare before converting: Inf (or a broken
// precondition) must not reach the cast. -ffp-contract=off keeps the two float32 roundings.
inline std::size_t abs_bin(float v, float range, float fbins, std::size_t nbins) noexcept {
    const float t = (std::fabs(v) / range) * fbins;
    return t >= fbins ? nbins - 1 : (t == t ? static_cast<std::size_t>(static_cast<std::int32_t>(t)) : nbins);  // t < 2^24: int32 is exact
}

void histogram_scalar(const float* x, std::size_t n, float range, std::uint64_t* lanes, std::size_t nbins) noexcept {
    const float fbins = static_cast<float>(nbins);
    const std::size_t stride = nbins + 1;
    std::uint64_t* l0 = lanes;
    std::uint64_t* l1 = lanes + stride;
    std::uint64_t* l2 = lanes + 2 * stride;
    std::uint64_t* l3 = lanes + 3 * stride;
    static_assert(kHistogramLanes == 4, "the unrolled loop below writes four lanes");
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4) {  // four independent bins per round: no store-to-load chain on peaked data
        const std::size_t b0 = abs_bin(x[i], range, fbins, nbins), b1 = abs_bin(x[i + 1], range, fbins, nbins);
        const std::size_t b2 = abs_bin(x[i + 2], range, fbins, nbins), b3 = abs_bin(x[i + 3], range, fbins, nbins);
        ++l0[b0];
        ++l1[b1];
        ++l2[b2];
        ++l3[b3];
    }
    for (; i < n; ++i) ++lanes[(i % 4) * stride + abs_bin(x[i], range, fbins, nbins)];
}

#ifdef KILN_X86
// The same two roundings per lane (div then mul, IEEE float32); t < nbins < 2^24 converts exactly.
__attribute__((target("avx2"))) void histogram_avx2(const float* x, std::size_t n, float range, std::uint64_t* lanes,
                                                    std::size_t nbins) noexcept {
    const __m256 vrange = _mm256_set1_ps(range), vbins = _mm256_set1_ps(static_cast<float>(nbins));
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i vlast = _mm256_set1_epi32(static_cast<int>(nbins - 1)), vnan = _mm256_set1_epi32(static_cast<int>(nbins));
    const std::size_t stride = nbins + 1;
    alignas(32) std::int32_t idx[8];
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 t = _mm256_mul_ps(_mm256_div_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)), vrange), vbins);
        const __m256i over = _mm256_castps_si256(_mm256_cmp_ps(t, vbins, _CMP_GE_OQ));
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(t, t, _CMP_UNORD_Q));
        __m256i b = _mm256_cvttps_epi32(t);  // garbage where over or NaN: replaced just below
        b = _mm256_blendv_epi8(b, vlast, over);
        b = _mm256_blendv_epi8(b, vnan, nan);
        _mm256_store_si256(reinterpret_cast<__m256i*>(idx), b);
        for (std::size_t l = 0; l < 8; ++l) ++lanes[(l % kHistogramLanes) * stride + static_cast<std::size_t>(idx[l])];
    }
    histogram_scalar(x + i, n - i, range, lanes, nbins);
}
#endif

}  // namespace

void abs_histogram_accumulate(const float* x, std::size_t n, float range, std::uint64_t* lanes,
                              std::size_t nbins, bool simd) noexcept {
#ifdef KILN_X86
    if (simd && simd_supported()) return histogram_avx2(x, n, range, lanes, nbins);
#endif
    (void)simd;
    histogram_scalar(x, n, range, lanes, nbins);
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
    double* level = scratch;           // [m] sum of the bins of each level
    double* norm = scratch + m;        // [m] nonzero bins of P in each level
    double* p = scratch + 2 * m;       // [i] P, then smoothed P
    double* q = scratch + 2 * m + i;   // [i] Q, then smoothed Q
    const std::size_t merged = i / m;
    for (std::size_t g = 0; g < m; ++g) level[g] = norm[g] = 0.0;
    std::size_t p_zeros = 0;
    for (std::size_t j = 0; j < i; ++j) {
        const std::size_t g = std::min(j / merged, m - 1);
        p[j] = static_cast<double>(bins[j]) + (j + 1 == i ? tail : 0.0);  // the outliers join the last bin
        level[g] += static_cast<double>(bins[j]);
        if (p[j] != 0.0) norm[g] += 1.0; else ++p_zeros;
    }
    std::size_t q_zeros = 0;
    for (std::size_t j = 0; j < i; ++j) {  // Q is zero where P is, and where a level's bins sum to 0
        const std::size_t g = std::min(j / merged, m - 1);
        q[j] = p[j] != 0.0 ? level[g] / std::max(norm[g], 1.0) : 0.0;
        if (q[j] == 0.0) ++q_zeros;
    }
    double p_shift, q_shift;
    if (!smoothing(p_zeros, i, &p_shift) || !smoothing(q_zeros, i, &q_shift)) return INFINITY;
    // normalize by the sums of the smoothed values themselves, as the twin does
    double ps = 0.0, qs = 0.0;
    for (std::size_t j = 0; j < i; ++j) {
        p[j] = p[j] == 0.0 ? 1e-4 : p[j] + p_shift;
        q[j] = q[j] == 0.0 ? 1e-4 : q[j] + q_shift;
        if (!(p[j] > 0.0) || !(q[j] > 0.0)) return INFINITY;
        ps += p[j];
        qs += q[j];
    }
    double kl = 0.0;
    for (std::size_t j = 0; j < i; ++j) {
        const double sp = p[j] / ps, sq = q[j] / qs;
        kl += sp * std::log(sp / sq);
    }
    return kl;
}

}  // namespace kiln
