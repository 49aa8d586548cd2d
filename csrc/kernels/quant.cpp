#include "kernels/quant.h"

#include <cmath>

#include "kernels/repack.h"  // simd_supported()
#include "kernels/simd_transpose.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KILN_X86 1
#endif

namespace kiln {
namespace {

bool use_simd(bool simd) noexcept {
#ifdef KILN_X86
    return simd && simd_supported();
#else
    (void)simd;
    return false;
#endif
}

int zp_value(std::uint8_t byte, bool is_signed) noexcept {
    return is_signed ? static_cast<int>(static_cast<std::int8_t>(byte)) : static_cast<int>(byte);
}

// ---------------- int8, scalar ----------------

void minmax_scalar(const float* x, std::size_t n, float& mn, float& mx) noexcept {
    for (std::size_t i = 0; i < n; ++i) {
        if (x[i] < mn) mn = x[i];  // comparisons with NaN are false: NaNs are skipped
        if (x[i] > mx) mx = x[i];
    }
}

std::uint8_t q8_one(float x, float scale, float zf, float lo, float hi) noexcept {
    float y = x / scale;
    if (y != y) y = 0.0f;
    float r = std::nearbyint(y) + zf;  // exact while |r| < 2^24; beyond that it clamps anyway
    r = r < lo ? lo : (r > hi ? hi : r);
    return static_cast<std::uint8_t>(static_cast<int>(r));  // two's complement byte for int8
}

void q8_uniform_scalar(const float* x, std::size_t n, float scale, float zf, float lo, float hi, std::uint8_t* q) noexcept {
    for (std::size_t i = 0; i < n; ++i) q[i] = q8_one(x[i], scale, zf, lo, hi);
}

// ---------------- int8, AVX2 ----------------
#ifdef KILN_X86

// min and max of 8 lanes, in registers (spilling to memory and reading lanes back stalls on
// store forwarding). Lanes never hold NaN. Which of +0 / -0 wins may differ from a scalar loop,
// but no result depends on it: every range is widened to hold +0 before use.
__attribute__((target("avx2"))) inline float hmin(__m256 v) noexcept {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps(m, m, 1)));
}
__attribute__((target("avx2"))) inline float hmax(__m256 v) noexcept {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

__attribute__((target("avx2"))) void minmax_avx2(const float* x, std::size_t n, float& mn, float& mx) noexcept {
    __m256 vmn = _mm256_set1_ps(mn), vmx = _mm256_set1_ps(mx);
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        vmn = _mm256_min_ps(v, vmn);  // a NaN in the first operand returns the second: NaNs skipped
        vmx = _mm256_max_ps(v, vmx);
    }
    const float lane_min = hmin(vmn), lane_max = hmax(vmx);
    if (lane_min < mn) mn = lane_min;
    if (lane_max > mx) mx = lane_max;
    minmax_scalar(x + i, n - i, mn, mx);
}

__attribute__((target("avx2"))) void minmax_cols_avx2(const float* x, std::size_t cols, float* mins, float* maxs) noexcept {
    std::size_t c = 0;
    for (; c + 8 <= cols; c += 8) {
        const __m256 v = _mm256_loadu_ps(x + c);
        _mm256_storeu_ps(mins + c, _mm256_min_ps(v, _mm256_loadu_ps(mins + c)));
        _mm256_storeu_ps(maxs + c, _mm256_max_ps(v, _mm256_loadu_ps(maxs + c)));
    }
    for (; c < cols; ++c) {
        if (x[c] < mins[c]) mins[c] = x[c];
        if (x[c] > maxs[c]) maxs[c] = x[c];
    }
}

// 8 int32 lanes -> their low bytes, stored as 8 consecutive bytes.
__attribute__((target("avx2"))) inline void store_low_bytes(std::uint8_t* q, __m256i v) noexcept {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    v = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, pick), _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm256_castsi256_si128(v));
}

// q8_one on 8 lanes: same operations in the same order.
__attribute__((target("avx2"))) inline __m256i q8_lanes(__m256 x, __m256 scale, __m256 zf, __m256 lo, __m256 hi) noexcept {
    __m256 y = _mm256_div_ps(x, scale);
    y = _mm256_and_ps(y, _mm256_cmp_ps(y, y, _CMP_ORD_Q));  // NaN -> 0
    __m256 r = _mm256_add_ps(_mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zf);
    r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
    return _mm256_cvttps_epi32(r);
}

__attribute__((target("avx2"))) void q8_uniform_avx2(const float* x, std::size_t n, float scale, float zf, float lo,
                                                      float hi, std::uint8_t* q) noexcept {
    const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zf), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) store_low_bytes(q + i, q8_lanes(_mm256_loadu_ps(x + i), vs, vz, vlo, vhi));
    q8_uniform_scalar(x + i, n - i, scale, zf, lo, hi, q + i);
}

// One scale and zero point per column.
__attribute__((target("avx2"))) void q8_columns_avx2(const float* x, std::size_t n, const float* scales,
                                                      const std::uint8_t* zps, bool is_signed, float lo, float hi,
                                                      std::uint8_t* q) noexcept {
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i zb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zps + i));
        const __m256i zi = is_signed ? _mm256_cvtepi8_epi32(zb) : _mm256_cvtepu8_epi32(zb);
        store_low_bytes(q + i, q8_lanes(_mm256_loadu_ps(x + i), _mm256_loadu_ps(scales + i), _mm256_cvtepi32_ps(zi), vlo, vhi));
    }
    for (; i < n; ++i) q[i] = q8_one(x[i], scales[i], static_cast<float>(zp_value(zps[i], is_signed)), lo, hi);
}

__attribute__((target("avx2"))) void dq8_avx2(const std::uint8_t* q, std::size_t n, const float* scales,
                                               const std::uint8_t* zps, std::size_t step, bool is_signed, float* out) noexcept {
    // step 0: scales[0] / zps[0] for all n values; step 1: one per value.
    __m256 vs = _mm256_set1_ps(scales[0]);
    __m256i vz = _mm256_set1_epi32(zp_value(zps[0], is_signed));
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i qb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i));
        const __m256i qi = is_signed ? _mm256_cvtepi8_epi32(qb) : _mm256_cvtepu8_epi32(qb);
        if (step) {
            const __m128i zb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zps + i));
            vz = is_signed ? _mm256_cvtepi8_epi32(zb) : _mm256_cvtepu8_epi32(zb);
            vs = _mm256_loadu_ps(scales + i);
        }
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(qi, vz)), vs));
    }
    for (; i < n; ++i) {
        const std::size_t j = i * step;
        out[i] = static_cast<float>(zp_value(q[i], is_signed) - zp_value(zps[j], is_signed)) * scales[j];
    }
}
#endif  // KILN_X86

// ---------------- int4 ----------------

constexpr std::size_t kMaxBlock = 256;
// W is walked in bands of whole blocks (at least kBandRows rows), each band panel by panel. A panel
// is gathered, transposed, into a tile so that each column's blocks are contiguous; 16 KiB keeps it
// in L1 beside the lines being read. Rows of a wide W are a power of two apart and share cache sets:
// the band is read front to back, each line used whole. 64 rows measured fastest on a 2-core Zen 4
// (32, 128 and 256 were slower).
constexpr std::size_t kTileFloats = 4096;
constexpr std::size_t kBandRows = 64;

// Half away from zero for x >= 0 (C roundf there), written as the SIMD path and the twin compute it.
inline float round_away_pos(float x) noexcept {
    const float t = std::trunc(x);
    return x - t >= 0.5f ? t + 1.0f : t;
}

struct Q4Params {
    float scale;
    float recip;
    std::uint8_t zp;
};

inline Q4Params int4_params(float mn, float mx, bool symmetric) noexcept {
    Q4Params p{};
    if (symmetric) {
        const float m = std::fabs(mx) > std::fabs(mn) ? mx : mn;
        p.scale = -m / 8.0f;  // the larger side maps to -8, as in onnxruntime
        p.zp = 8;
    } else {
        p.scale = (mx - mn) / 15.0f;
        const float zpf = p.scale != 0.0f ? 0.0f - mn / p.scale : mn;
        p.zp = static_cast<std::uint8_t>(zpf > 0.0f ? (zpf < 15.0f ? round_away_pos(zpf) : 15.0f) : 0.0f);
    }
    p.recip = p.scale != 0.0f ? 1.0f / p.scale : 0.0f;
    return p;
}

inline std::uint8_t q4_one(float x, float recip, float zf) noexcept {
    float y = x * recip + zf;   // two roundings (no FMA: -ffp-contract=off), as in onnxruntime
    y = y > 0.0f ? y : 0.0f;    // NaN -> 0
    y = y < 15.0f ? y : 15.0f;
    return static_cast<std::uint8_t>(round_away_pos(y));
}

// One block of bs (a multiple of 16) contiguous floats, zero padded: params and packed nibbles.
Q4Params q4_block_scalar(const float* v, std::size_t bs, bool symmetric, std::uint8_t* out) noexcept {
    float mn = 0.0f, mx = 0.0f;  // the range always holds 0, so the zero padding changes nothing
    minmax_scalar(v, bs, mn, mx);
    const Q4Params p = int4_params(mn, mx, symmetric);
    const float zf = static_cast<float>(p.zp);
    for (std::size_t i = 0; i < bs; i += 2) {
        out[i / 2] = static_cast<std::uint8_t>(q4_one(v[i], p.recip, zf) | (q4_one(v[i + 1], p.recip, zf) << 4));
    }
    return p;
}

// The outputs and their geometry.
struct Int4Out {
    std::uint8_t* B;
    float* scales;
    std::uint8_t* zero_points;
    std::size_t bs, n_blocks, zp_stride;
    bool symmetric;

    std::uint8_t* blob(std::size_t col, std::size_t b) const noexcept { return B + (col * n_blocks + b) * (bs / 2); }

    // After block b of column col got its nibbles: padding nibbles, scale and zero point.
    void finish(std::size_t col, std::size_t b, std::size_t kl, const Q4Params& p) const noexcept {
        std::uint8_t* out = blob(col, b);
        for (std::size_t i = kl; i < bs; ++i) out[i / 2] &= (i & 1) ? 0x0F : 0xF0;  // padding nibbles are 0
        scales[col * n_blocks + b] = p.scale;
        if (!symmetric) {
            std::uint8_t& z = zero_points[col * zp_stride + b / 2];  // an odd last block leaves 8 as padding
            z = (b & 1) ? static_cast<std::uint8_t>((z & 0x0F) | (p.zp << 4)) : static_cast<std::uint8_t>(p.zp | 0x80);
        }
    }
};

// A panel of a band: the tile holds columns [n, n + cw), each `rows` deep (the band, zero padded to
// whole blocks) at tile + c * depth; the band starts at block b0.
struct Panel {
    const float* tile;
    std::size_t n, cw, b0, rows, depth;
};

// tile[c * depth + i] = w[i * ld + c] for i < rows, c in [c0, cw); zeros for rows <= i < depth.
void gather_rest(const float* w, std::size_t ld, std::size_t rows, std::size_t c0, std::size_t cw, std::size_t depth,
                 float* tile) noexcept {
    for (std::size_t i = 0; i < rows; ++i) {
        for (std::size_t c = c0; c < cw; ++c) tile[c * depth + i] = w[i * ld + c];
    }
}

void zero_padding(std::size_t rows, std::size_t cw, std::size_t depth, float* tile) noexcept {
    for (std::size_t c = 0; c < cw; ++c) {
        for (std::size_t i = rows; i < depth; ++i) tile[c * depth + i] = 0.0f;
    }
}

void int4_panel_scalar(const Panel& pn, const Int4Out& o) noexcept {
    for (std::size_t c = 0; c < pn.cw; ++c) {
        for (std::size_t j = 0; j * o.bs < pn.rows; ++j) {
            const std::size_t kl = pn.rows - j * o.bs < o.bs ? pn.rows - j * o.bs : o.bs;
            const Q4Params p = q4_block_scalar(pn.tile + c * pn.depth + j * o.bs, o.bs, o.symmetric, o.blob(pn.n + c, pn.b0 + j));
            o.finish(pn.n + c, pn.b0 + j, kl, p);
        }
    }
}

#ifdef KILN_X86
// q4_one on 8 lanes; each 64-bit lane then holds the pair (q[2j], q[2j+1]), folded into the
// low byte as q[2j] | q[2j+1] << 4.
__attribute__((target("avx2"))) inline __m256i q4_pairs(const float* x, __m256 recip, __m256 zf) noexcept {
    __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_load_ps(x), recip), zf);
    y = _mm256_min_ps(_mm256_max_ps(y, _mm256_setzero_ps()), _mm256_set1_ps(15.0f));  // max(NaN, 0) gives 0
    const __m256 t = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 up = _mm256_and_ps(_mm256_cmp_ps(_mm256_sub_ps(y, t), _mm256_set1_ps(0.5f), _CMP_GE_OQ), _mm256_set1_ps(1.0f));
    const __m256i q = _mm256_cvttps_epi32(_mm256_add_ps(t, up));
    return _mm256_or_si256(q, _mm256_srli_epi64(q, 28));
}

// q4_block_scalar for a 32-byte aligned block.
__attribute__((target("avx2"))) inline Q4Params q4_block_avx2(const float* v, std::size_t bs, bool symmetric,
                                                               std::uint8_t* out) noexcept {
    __m256 vmn = _mm256_setzero_ps(), vmx = _mm256_setzero_ps();  // the range holds 0 (and +0 wins ties)
    for (std::size_t i = 0; i < bs; i += 8) {
        const __m256 x = _mm256_load_ps(v + i);
        vmn = _mm256_min_ps(x, vmn);  // NaN in the first operand returns the second: NaNs skipped
        vmx = _mm256_max_ps(x, vmx);
    }
    const Q4Params p = int4_params(hmin(vmn), hmax(vmx), symmetric);
    const __m256 recip = _mm256_set1_ps(p.recip), zf = _mm256_set1_ps(static_cast<float>(p.zp));
    // Bytes 0 and 8 of each 128-bit lane hold a packed pair; place them so that one OR of the two
    // halves gives the 8 bytes in order: a.lane0 -> 0,1  a.lane1 -> 2,3  b.lane0 -> 4,5  b.lane1 -> 6,7.
    const __m256i pick_a = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                            -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i pick_b = _mm256_setr_epi8(-1, -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                            -1, -1, -1, -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1);
    for (std::size_t i = 0; i < bs; i += 16) {
        const __m256i packed = _mm256_or_si256(_mm256_shuffle_epi8(q4_pairs(v + i, recip, zf), pick_a),
                                               _mm256_shuffle_epi8(q4_pairs(v + i + 8, recip, zf), pick_b));
        const __m128i bytes = _mm_or_si128(_mm256_castsi256_si128(packed), _mm256_extracti128_si256(packed, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i / 2), bytes);
    }
    return p;
}


__attribute__((target("avx2"))) void gather_avx2(const float* w, std::size_t ld, std::size_t rows, std::size_t cw,
                                                  std::size_t depth, float* tile) noexcept {
    // Row groups outside: 8 rows are used up across the whole panel before the next 8
    // (rows a power of two apart share cache sets, so a line should not be needed twice).
    const std::size_t r8 = rows / 8 * 8, c8 = cw / 8 * 8;
    for (std::size_t i = 0; i < r8; i += 8) {
        for (std::size_t c = 0; c < c8; c += 8) simd::transpose8x8_u32<false>(reinterpret_cast<const std::uint32_t*>(w + i * ld + c), ld,
                                                                   reinterpret_cast<std::uint32_t*>(tile + c * depth + i), depth);
    }
    for (std::size_t i = r8; i < rows; ++i) {
        for (std::size_t c = 0; c < c8; ++c) tile[c * depth + i] = w[i * ld + c];
    }
    gather_rest(w, ld, rows, c8, cw, depth, tile);
}

__attribute__((target("avx2"))) void int4_panel_avx2(const Panel& pn, const Int4Out& o) noexcept {
    for (std::size_t c = 0; c < pn.cw; ++c) {
        for (std::size_t j = 0; j * o.bs < pn.rows; ++j) {
            const std::size_t kl = pn.rows - j * o.bs < o.bs ? pn.rows - j * o.bs : o.bs;
            const Q4Params p = q4_block_avx2(pn.tile + c * pn.depth + j * o.bs, o.bs, o.symmetric, o.blob(pn.n + c, pn.b0 + j));
            o.finish(pn.n + c, pn.b0 + j, kl, p);
        }
    }
}
#endif

}  // namespace

// ---------------- int8 entry points ----------------

MinMax minmax_f32(const float* x, std::size_t n, bool simd) noexcept {
    MinMax m{INFINITY, -INFINITY};
#ifdef KILN_X86
    if (use_simd(simd)) {
        minmax_avx2(x, n, m.min, m.max);
        return m;
    }
#endif
    (void)simd;
    minmax_scalar(x, n, m.min, m.max);
    return m;
}

void minmax_cols_f32(const float* x, std::size_t rows, std::size_t cols, std::size_t ld, float* mins, float* maxs,
                     bool simd) noexcept {
    const bool vec = use_simd(simd);
    for (std::size_t r = 0; r < rows; ++r) {
        const float* row = x + r * ld;
#ifdef KILN_X86
        if (vec) {
            minmax_cols_avx2(row, cols, mins, maxs);
            continue;
        }
#endif
        (void)vec;
        for (std::size_t c = 0; c < cols; ++c) {
            if (row[c] < mins[c]) mins[c] = row[c];
            if (row[c] > maxs[c]) maxs[c] = row[c];
        }
    }
}

void int8_params(float mn, float mx, bool symmetric, int qmin, int qmax, float* scale, std::uint8_t* zp) noexcept {
    mn = mn < 0.0f ? mn : 0.0f;  // the range always holds 0 (also maps +Inf of an empty range to 0)
    mx = mx > 0.0f ? mx : 0.0f;
    float s;
    int z = 0;
    if (symmetric) {
        s = (-mn > mx ? -mn : mx) / static_cast<float>(qmax);
    } else {
        s = (mx - mn) / static_cast<float>(qmax - qmin);
    }
    if (s == 0.0f) s = 1.0f;
    if (!symmetric) {
        const float zf = std::nearbyint(static_cast<float>(qmin) - mn / s);
        z = zf > static_cast<float>(qmin) ? (zf < static_cast<float>(qmax) ? static_cast<int>(zf) : qmax) : qmin;
    }
    *scale = s;
    *zp = static_cast<std::uint8_t>(z);
}

void quantize_int8(const float* x, std::size_t rows, std::size_t cols, const float* scales, const std::uint8_t* zps,
                   std::size_t s_row, std::size_t s_col, int qmin, int qmax, std::uint8_t* q, bool simd) noexcept {
    const bool is_signed = qmin < 0, vec = use_simd(simd);
    const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
    for (std::size_t r = 0; r < rows; ++r) {
        const float* xr = x + r * cols;
        std::uint8_t* qr = q + r * cols;
        const float* sr = scales + r * s_row;
        const std::uint8_t* zr = zps + r * s_row;
        if (s_col == 0) {
            const float zf = static_cast<float>(zp_value(zr[0], is_signed));
#ifdef KILN_X86
            if (vec) {
                q8_uniform_avx2(xr, cols, sr[0], zf, lo, hi, qr);
                continue;
            }
#endif
            q8_uniform_scalar(xr, cols, sr[0], zf, lo, hi, qr);
            continue;
        }
#ifdef KILN_X86
        if (vec) {
            q8_columns_avx2(xr, cols, sr, zr, is_signed, lo, hi, qr);
            continue;
        }
#endif
        (void)vec;
        for (std::size_t c = 0; c < cols; ++c) {
            qr[c] = q8_one(xr[c], sr[c], static_cast<float>(zp_value(zr[c], is_signed)), lo, hi);
        }
    }
}

void quantize_int8_rows(const float* x, std::size_t rows, std::size_t cols, bool symmetric, int qmin, int qmax,
                        float* scales, std::uint8_t* zps, std::uint8_t* q, bool simd) noexcept {
    for (std::size_t r = 0; r < rows; ++r) {
        const MinMax m = minmax_f32(x + r * cols, cols, simd);
        int8_params(m.min, m.max, symmetric, qmin, qmax, scales + r, zps + r);
        quantize_int8(x + r * cols, 1, cols, scales + r, zps + r, 0, 0, qmin, qmax, q + r * cols, simd);
    }
}

void dequantize_int8(const std::uint8_t* q, bool is_signed, std::size_t rows, std::size_t cols, const float* scales,
                     const std::uint8_t* zps, std::size_t s_row, std::size_t s_col, float* out, bool simd) noexcept {
    const bool vec = use_simd(simd);
    for (std::size_t r = 0; r < rows; ++r) {
        const std::uint8_t* qr = q + r * cols;
        const float* sr = scales + r * s_row;
        const std::uint8_t* zr = zps + r * s_row;
        float* outr = out + r * cols;
#ifdef KILN_X86
        if (vec && cols) {
            dq8_avx2(qr, cols, sr, zr, s_col, is_signed, outr);
            continue;
        }
#endif
        (void)vec;
        for (std::size_t c = 0; c < cols; ++c) {
            const std::size_t j = c * s_col;
            outr[c] = static_cast<float>(zp_value(qr[c], is_signed) - zp_value(zr[j], is_signed)) * sr[j];
        }
    }
}

// ---------------- int4 entry point ----------------

void quantize_int4_matmulnbits(const float* w, std::size_t K, std::size_t N, std::size_t block_size, bool symmetric,
                               std::size_t n0, std::size_t n1, std::uint8_t* B, float* scales,
                               std::uint8_t* zero_points, bool simd) noexcept {
    if (block_size < 16 || block_size > kMaxBlock || (block_size & (block_size - 1))) return;
    const std::size_t bs = block_size, n_blocks = (K + bs - 1) / bs;
    const Int4Out o{B, scales, zero_points, bs, n_blocks, (n_blocks + 1) / 2, symmetric};
    const bool vec = use_simd(simd);
    const std::size_t band_blocks = bs >= kBandRows ? 1 : kBandRows / bs, band_rows = band_blocks * bs;
    const std::size_t panel = kTileFloats / band_rows;
    alignas(32) float tile[kTileFloats];
    for (std::size_t b0 = 0; b0 < n_blocks; b0 += band_blocks) {
        const std::size_t k0 = b0 * bs, rows = K - k0 < band_rows ? K - k0 : band_rows;
        const std::size_t depth = (rows + bs - 1) / bs * bs;
        for (std::size_t n = n0; n < n1; n += panel) {
            const std::size_t cw = n1 - n < panel ? n1 - n : panel;
            const Panel pn{tile, n, cw, b0, rows, depth};
#ifdef KILN_X86
            if (vec) {
                gather_avx2(w + k0 * N + n, N, rows, cw, depth, tile);
                zero_padding(rows, cw, depth, tile);
                int4_panel_avx2(pn, o);
                continue;
            }
#endif
            (void)vec;
            gather_rest(w + k0 * N + n, N, rows, 0, cw, depth, tile);
            zero_padding(rows, cw, depth, tile);
            int4_panel_scalar(pn, o);
        }
    }
}

}  // namespace kiln
