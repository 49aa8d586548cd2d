// Streaming activation calibration (int8): running range and |x| histograms, one batch at a time.
// Kernel rules: raw pointers and sizes, no allocation, no I/O, noexcept, single-threaded (the binding
// splits large batches across threads). The numpy twins in kiln.native.twins (minmax_update,
// abs_histogram_accumulate) define every result bit for bit.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {

// Running min / max of x[0..n): *lo = min(*lo, x[i]), *hi = max(*hi, x[i]) with strict comparisons
// in index order, so among equal values (+0 / -0) the first one seen wins. NaNs are skipped and
// counted into *nan_count. Start from lo = +Inf, hi = -Inf. Eight lanes at a time with AVX2 where the
// CPU has it (~4x the scalar loop): the same values, zero signs included.
void minmax_update(const float* x, std::size_t n, float* lo, float* hi, std::int64_t* nan_count) noexcept;

// Adds x[0..n) to a histogram of |x| over [0, range] with nbins equal bins:
//   t = (|x| / range) * (float)nbins      (float32, two roundings, in this order)
//   bin = t >= nbins ? nbins - 1 : (size_t)t
// so |x| == range and +-Inf land in the last bin. NaNs are skipped (minmax_update counts them).
// Counts go to kHistogramLanes interleaved histograms (element i to lane i % lanes), each
// nbins + 1 long (the extra slot takes the NaNs): consecutive values landing in the same bin then
// increment different memory, which is what limits a single histogram on peaked data. The caller
// sums lanes[l * (nbins + 1) + b] over l; lanes must be zeroed (or hold earlier counts).
// Preconditions: range > 0 and finite, 0 < nbins < 2^24 (exact as float); a finite |x| > range is
// counted in the last bin (the streaming observer grows range first, so it never sends one).
constexpr std::size_t kHistogramLanes = 4;
// simd: compute the bin indices 8 at a time with AVX2 when the CPU has it (the same IEEE float32
// operations, so the same bins; tests run both paths).
void abs_histogram_accumulate(const float* x, std::size_t n, float range, std::uint64_t* lanes,
                              std::size_t nbins, bool simd = true) noexcept;

// minmax_update and abs_histogram_accumulate in one read of x (the same results as calling both),
// for a batch whose range is not known to fit yet: a finite |x| above range lands in the last bin,
// so the caller keeps these lanes only when the batch's finite abs max is <= range.
void minmax_abs_histogram(const float* x, std::size_t n, float range, float* lo, float* hi, std::int64_t* nan_count,
                          std::uint64_t* lanes, std::size_t nbins, bool simd = true) noexcept;


// TensorRT's KL-divergence threshold search on a |x| histogram, one candidate i: the KL(P || Q) of
// clipping at bin i (i in [m, n]) with m quantized levels. P = bins[0, i) with bins[i, n) added to its
// last bin; Q = bins[0, i) merged into m levels of i / m bins (the remainder joins the last level), each
// level spread evenly over its bins where P is nonzero. Both smoothed (zeros get eps = 1e-4, taken evenly
// off the nonzero bins) and normalized; float64 throughout, sums in index order. Returns +Inf when a
// smoothed distribution is not positive. tail = sum of bins[i, n). scratch: 2 * (m + i) doubles.
// Twin: kiln.native.twins.entropy_kl.
double entropy_kl(const std::uint64_t* bins, std::size_t i, std::size_t m, double tail, double* scratch) noexcept;
}  // namespace kiln
