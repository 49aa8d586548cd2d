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

// Running state of the eight-lane min / max (NaNs masked to +-Inf and counted).
struct MinMaxLanes {
    __m256 mn, mx;
    std::int64_t nans;
};

__attribute__((target("avx2"))) inline MinMaxLanes minmax_start() noexcept {
    return {_mm256_set1_ps(INFINITY), _mm256_set1_ps(-INFINITY), 0};
}

__attribute__((target("avx2"))) inline void minmax_step(MinMaxLanes& m, __m256 v) noexcept {
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    m.nans += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(nan)));
    m.mn = _mm256_min_ps(m.mn, _mm256_blendv_ps(v, _mm256_set1_ps(INFINITY), nan));
    m.mx = _mm256_max_ps(m.mx, _mm256_blendv_ps(v, _mm256_set1_ps(-INFINITY), nan));
}

// Folds the lanes, then the scalar tail x[i..n), into *lo / *hi / *nan_count (x: the whole range).
__attribute__((target("avx2"))) void minmax_finish(const MinMaxLanes& m, const float* x, std::size_t i, std::size_t n,
                                                   float* lo, float* hi, std::int64_t* nan_count) noexcept {
    alignas(32) float lmn[8], lmx[8];
    _mm256_store_ps(lmn, m.mn);
    _mm256_store_ps(lmx, m.mx);
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
    *nan_count += m.nans + tail_nans;
}

__attribute__((target("avx2"))) void minmax_avx2(const float* x, std::size_t n, float* lo, float* hi,
                                                 std::int64_t* nan_count) noexcept {
    MinMaxLanes m = minmax_start();
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) minmax_step(m, _mm256_loadu_ps(x + i));
    minmax_finish(m, x, i, n, lo, hi, nan_count);
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
struct BinConstants {
    __m256 range, bins, sign;
    __m256i last, nan;
};

__attribute__((target("avx2"))) inline BinConstants bin_constants(float range, std::size_t nbins) noexcept {
    return {_mm256_set1_ps(range), _mm256_set1_ps(static_cast<float>(nbins)), _mm256_set1_ps(-0.0f),
            _mm256_set1_epi32(static_cast<int>(nbins - 1)), _mm256_set1_epi32(static_cast<int>(nbins))};
}

// The bins of eight values (nbins for a NaN: its lane's spare slot).
__attribute__((target("avx2"))) inline __m256i bins8(const BinConstants& c, __m256 v) noexcept {
    const __m256 t = _mm256_mul_ps(_mm256_div_ps(_mm256_andnot_ps(c.sign, v), c.range), c.bins);
    const __m256i over = _mm256_castps_si256(_mm256_cmp_ps(t, c.bins, _CMP_GE_OQ));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(t, t, _CMP_UNORD_Q));
    const __m256i b = _mm256_cvttps_epi32(t);  // garbage where over or NaN: replaced just below
    return _mm256_blendv_epi8(_mm256_blendv_epi8(b, c.last, over), c.nan, nan);
}

// Values per round of the main loops: four vectors' bins are computed before any is counted, and
// the input is prefetched a few rounds ahead. Activations arrive from the model out of cache, and
// the increments alone leave the load unit idle between misses: 1.7x the one-vector loop on BERT's.
constexpr std::size_t kRound = 32;
constexpr std::size_t kPrefetchAhead = 512;  // floats (2 KiB); a prefetch past the end is harmless

// Counts idx[0..kRound) into the lanes (element l to lane l % kHistogramLanes).
inline void count_round(const std::int32_t* idx, std::uint64_t* lanes, std::size_t stride) noexcept {
    for (std::size_t l = 0; l < kRound; ++l) ++lanes[(l % kHistogramLanes) * stride + static_cast<std::size_t>(idx[l])];
}

// minmax: also fold every value into m (the fused kernel); the compiler drops it where false.
template <bool kMinMax>
__attribute__((target("avx2"))) inline std::size_t histogram_rounds(const float* x, std::size_t n, const BinConstants& c,
                                                                    std::uint64_t* lanes, std::size_t stride, MinMaxLanes& m) noexcept {
    alignas(32) std::int32_t idx[kRound];
    std::size_t i = 0;
    for (; i + kRound <= n; i += kRound) {
        _mm_prefetch(reinterpret_cast<const char*>(x + i + kPrefetchAhead), _MM_HINT_T0);
        for (std::size_t v = 0; v < kRound / 8; ++v) {
            const __m256 xv = _mm256_loadu_ps(x + i + 8 * v);
            if constexpr (kMinMax) minmax_step(m, xv);
            _mm256_store_si256(reinterpret_cast<__m256i*>(idx + 8 * v), bins8(c, xv));
        }
        count_round(idx, lanes, stride);
    }
    return i;  // the tail x[i..n) is left to the scalar loops
}

__attribute__((target("avx2"))) void histogram_avx2(const float* x, std::size_t n, float range, std::uint64_t* lanes,
                                                    std::size_t nbins) noexcept {
    MinMaxLanes unused = minmax_start();
    const std::size_t i = histogram_rounds<false>(x, n, bin_constants(range, nbins), lanes, nbins + 1, unused);
    histogram_scalar(x + i, n - i, range, lanes, nbins);
}

// Both in one read of x.
__attribute__((target("avx2"))) void minmax_histogram_avx2(const float* x, std::size_t n, float range, float* lo, float* hi,
                                                           std::int64_t* nan_count, std::uint64_t* lanes, std::size_t nbins) noexcept {
    MinMaxLanes m = minmax_start();
    const std::size_t i = histogram_rounds<true>(x, n, bin_constants(range, nbins), lanes, nbins + 1, m);
    minmax_finish(m, x, i, n, lo, hi, nan_count);
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

void minmax_abs_histogram(const float* x, std::size_t n, float range, float* lo, float* hi, std::int64_t* nan_count,
                          std::uint64_t* lanes, std::size_t nbins, bool simd) noexcept {
#ifdef KILN_X86
    if (simd && simd_supported()) return minmax_histogram_avx2(x, n, range, lo, hi, nan_count, lanes, nbins);
#endif
    minmax_scalar(x, n, lo, hi, nan_count);
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
