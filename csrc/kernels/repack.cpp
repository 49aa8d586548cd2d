#include "kernels/repack.h"

#include <cstring>

#include "kernels/simd_transpose.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KILN_X86 1
#endif

namespace kiln {
namespace {

std::uint32_t bits_of(float f) noexcept {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

float float_of(std::uint32_t u) noexcept {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// ---- scalar definitions (integer arithmetic only: no dependence on the FP environment) ----

std::uint16_t f32_to_f16_one(float f) noexcept {
    const std::uint32_t x = bits_of(f);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    const std::uint32_t ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u);  // NaN
    if (ax >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u); // >= 65520 rounds to Inf
    if (ax >= 0x38800000u) {  // normal half (>= 2^-14): round at bit 13, rebias exponent 127 -> 15
        const std::uint32_t r = ax + 0x0FFFu + ((ax >> 13) & 1u) - (112u << 23);
        return static_cast<std::uint16_t>(sign | (r >> 13));
    }
    if (ax <= 0x33000000u) return static_cast<std::uint16_t>(sign);  // <= 2^-25: the tie goes to even 0
    // Subnormal half: the 24-bit significand shifted right by 14..24, rounded to nearest even.
    // A carry into bit 10 gives the smallest normal half, which is the right encoding.
    const std::uint32_t e = ax >> 23;
    const std::uint32_t mant = (ax & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t shift = 126u - e;
    std::uint32_t m = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (m & 1u))) ++m;
    return static_cast<std::uint16_t>(sign | m);
}

std::uint16_t f32_to_bf16_one(float f) noexcept {
    const std::uint32_t x = bits_of(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>(((x >> 16) & 0x8000u) | 0x7FC0u);
    return static_cast<std::uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

float f16_to_f32_one(std::uint16_t h) noexcept {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    std::uint32_t e = (h >> 10) & 0x1Fu;
    std::uint32_t m = h & 0x3FFu;
    if (e == 0x1F) return float_of(sign | 0x7F800000u | (m ? (0x400000u | (m << 13)) : 0u));
    if (e == 0) {
        if (m == 0) return float_of(sign);
        e = 113;  // subnormal half m * 2^-24: normalise into a float exponent
        while (!(m & 0x400u)) {
            m <<= 1;
            --e;
        }
        return float_of(sign | (e << 23) | ((m & 0x3FFu) << 13));
    }
    return float_of(sign | ((e + 112u) << 23) | (m << 13));
}

void f32_to_f16_scalar(const float* s, std::uint16_t* d, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) d[i] = f32_to_f16_one(s[i]);
}
void f32_to_bf16_scalar(const float* s, std::uint16_t* d, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) d[i] = f32_to_bf16_one(s[i]);
}
void f16_to_f32_scalar(const std::uint16_t* s, float* d, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) d[i] = f16_to_f32_one(s[i]);
}
void bf16_to_f32_scalar(const std::uint16_t* s, float* d, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) d[i] = float_of(static_cast<std::uint32_t>(s[i]) << 16);
}

// ---- AVX2 + F16C paths; the scalar code above handles the tails ----
#ifdef KILN_X86

// Outputs at least this large skip the cache on their way to memory (non-temporal stores): they
// would not stay in cache anyway, and it saves reading every output line before overwriting it.
constexpr std::size_t kStreamBytes = std::size_t{1} << 20;

// Elements to do one by one before dst is `align`-byte aligned for the streaming stores; n (none
// streamed) when the output is small or its elements are not naturally aligned.
template <class T>
std::size_t stream_head(const T* dst, std::size_t n, std::size_t align) noexcept {
    const auto addr = reinterpret_cast<std::uintptr_t>(dst);
    if (n * sizeof(T) < kStreamBytes || addr % sizeof(T)) return n;
    return ((align - addr % align) % align) / sizeof(T);
}

// f32_to_f16_one on 8 lanes. The hardware rounds exactly (RNE, subnormals, overflow to Inf) but keeps
// NaN payloads: NaN lanes are replaced by the canonical sign | 0x7E00.
__attribute__((target("avx2,f16c"))) inline __m128i f16_lanes(__m256 x) noexcept {
    const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
    const __m128i canon = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000))), _mm_set1_epi16(0x7E00));
    return _mm_blendv_epi8(h, canon, nan16);
}

__attribute__((target("avx2,f16c"))) void f32_to_f16_avx2(const float* s, std::uint16_t* d, std::size_t n) noexcept {
    std::size_t i = stream_head(d, n, 16);
    if (i < n) {
        f32_to_f16_scalar(s, d, i);
        for (; i + 8 <= n; i += 8) _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), f16_lanes(_mm256_loadu_ps(s + i)));
        _mm_sfence();  // order the streamed stores before whatever tells another thread we are done
    } else {
        i = 0;
    }
    for (; i + 8 <= n; i += 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), f16_lanes(_mm256_loadu_ps(s + i)));
    f32_to_f16_scalar(s + i, d + i, n - i);
}

// f32_to_bf16_one on 8 lanes, leaving each result in the low half of its 32-bit lane.
__attribute__((target("avx2"))) inline __m256i bf16_lanes(__m256i x) noexcept {
    const __m256i hi = _mm256_srli_epi32(x, 16);
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), _mm256_and_si256(hi, _mm256_set1_epi32(1))), 16);
    // |x| > Inf bits: NaN. A signed compare is right here, both sides are below 2^31.
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
    const __m256i canon = _mm256_or_si256(_mm256_and_si256(hi, _mm256_set1_epi32(0x8000)), _mm256_set1_epi32(0x7FC0));
    return _mm256_blendv_epi8(r, canon, nan);
}

// 16 floats -> 16 bf16. packus works within 128-bit lanes (a0 b0 a1 b1); the permute restores order.
__attribute__((target("avx2"))) inline __m256i bf16_x16(const float* s) noexcept {
    const __m256i a = bf16_lanes(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    const __m256i b = bf16_lanes(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 8)));
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
}

__attribute__((target("avx2"))) void f32_to_bf16_avx2(const float* s, std::uint16_t* d, std::size_t n) noexcept {
    std::size_t i = stream_head(d, n, 32);
    if (i < n) {
        f32_to_bf16_scalar(s, d, i);
        for (; i + 16 <= n; i += 16) _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), bf16_x16(s + i));
        _mm_sfence();
    } else {
        i = 0;
    }
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), bf16_x16(s + i));
    f32_to_bf16_scalar(s + i, d + i, n - i);
}

__attribute__((target("avx2,f16c"))) void f16_to_f32_avx2(const std::uint16_t* s, float* d, std::size_t n) noexcept {
    std::size_t i = stream_head(d, n, 32);
    if (i < n) {
        f16_to_f32_scalar(s, d, i);
        for (; i + 8 <= n; i += 8) {
            _mm256_stream_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
        }
        _mm_sfence();
    } else {
        i = 0;
    }
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));  // exact; NaNs come out quiet
    }
    f16_to_f32_scalar(s + i, d + i, n - i);
}

__attribute__((target("avx2"))) inline __m256i bf16_widen(const std::uint16_t* s) noexcept {
    return _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))), 16);
}

__attribute__((target("avx2"))) void bf16_to_f32_avx2(const std::uint16_t* s, float* d, std::size_t n) noexcept {
    std::size_t i = stream_head(d, n, 32);
    if (i < n) {
        bf16_to_f32_scalar(s, d, i);
        for (; i + 8 <= n; i += 8) _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), bf16_widen(s + i));
        _mm_sfence();
    } else {
        i = 0;
    }
    for (; i + 8 <= n; i += 8) _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), bf16_widen(s + i));
    bf16_to_f32_scalar(s + i, d + i, n - i);
}

bool cpu_has_avx2_f16c() noexcept {
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    return ok;
}
#else
bool cpu_has_avx2_f16c() noexcept { return false; }
#endif

// ---- transpose ----

// Rows [r0, r1) x columns [c0, c1) of src, in square tiles: a tile's source lines are reused from L1
// while its destination rows are written contiguously.
template <class T>
void transpose_tiled(const T* src, T* dst, std::size_t rows, std::size_t cols, std::size_t r0, std::size_t r1,
                     std::size_t c0, std::size_t c1) noexcept {
    constexpr std::size_t tile = sizeof(T) >= 4 ? 32 : 64;
    for (std::size_t cb = c0; cb < c1; cb += tile) {
        const std::size_t ce = cb + tile < c1 ? cb + tile : c1;
        for (std::size_t rb = r0; rb < r1; rb += tile) {
            const std::size_t re = rb + tile < r1 ? rb + tile : r1;
            for (std::size_t c = cb; c < ce; ++c) {
                for (std::size_t r = rb; r < re; ++r) dst[c * rows + r] = src[r * cols + c];
            }
        }
    }
}

#ifdef KILN_X86

// 4-byte elements in bands of 16 source rows, walked left to right (the source is read front to
// back) in blocks of 128 columns, each done as 8x8 register transposes, two per 64-byte destination
// line one after the other. Destination lines are scattered (one per destination row and band), so
// for a large output the lines go straight to memory (non-temporal): no read of each line first.
template <bool Stream>
__attribute__((target("avx2"))) void transpose4_avx2(const std::uint32_t* src, std::uint32_t* dst, std::size_t rows,
                                                      std::size_t cols, std::size_t c0, std::size_t c1,
                                                      std::size_t r0) noexcept {
    constexpr std::size_t kBand = 16, kBlock = 128;
    const std::size_t r1 = r0 + (rows - r0) / kBand * kBand, c8 = c0 + (c1 - c0) / 8 * 8;
    for (std::size_t r = r0; r < r1; r += kBand) {
        for (std::size_t cb = c0; cb < c8; cb += kBlock) {
            const std::size_t ce = cb + kBlock < c8 ? cb + kBlock : c8;
            for (std::size_t c = cb; c < ce; c += 8) {
                simd::transpose8x8_u32<Stream>(src + r * cols + c, cols, dst + c * rows + r, rows);
                simd::transpose8x8_u32<Stream>(src + (r + 8) * cols + c, cols, dst + c * rows + r + 8, rows);
            }
        }
    }
    if (Stream) _mm_sfence();  // order the streamed stores before whatever tells another thread we are done
    transpose_tiled(src, dst, rows, cols, 0, r0, c0, c1);      // top edge (up to the first aligned row)
    transpose_tiled(src, dst, rows, cols, r0, r1, c8, c1);     // right edge
    transpose_tiled(src, dst, rows, cols, r1, rows, c0, c1);   // bottom edge
}

void transpose4_simd(const std::uint32_t* src, std::uint32_t* dst, std::size_t rows, std::size_t cols, std::size_t c0,
                     std::size_t c1) noexcept {
    // A band's 16 elements must fill one whole 64-byte line of each destination row (a partly written
    // line is expensive to stream). With rows % 16 == 0 every destination row has the same
    // misalignment, so starting the bands at row r0 aligns them all (numpy gives 16-byte alignment).
    const auto addr = reinterpret_cast<std::uintptr_t>(dst);
    const std::size_t r0 = (64 - addr % 64) % 64 / 4;
    if (addr % 4 == 0 && rows % 16 == 0 && rows >= r0 + 16 && rows * (c1 - c0) * 4 >= kStreamBytes) {
        return transpose4_avx2<true>(src, dst, rows, cols, c0, c1, r0);
    }
    transpose4_avx2<false>(src, dst, rows, cols, c0, c1, 0);
}
#endif

}  // namespace

bool simd_supported() noexcept { return cpu_has_avx2_f16c(); }

void f32_to_f16(const float* src, std::uint16_t* dst, std::size_t n, bool simd) noexcept {
#ifdef KILN_X86
    if (simd && cpu_has_avx2_f16c()) return f32_to_f16_avx2(src, dst, n);
#endif
    (void)simd;
    f32_to_f16_scalar(src, dst, n);
}

void f32_to_bf16(const float* src, std::uint16_t* dst, std::size_t n, bool simd) noexcept {
#ifdef KILN_X86
    if (simd && cpu_has_avx2_f16c()) return f32_to_bf16_avx2(src, dst, n);
#endif
    (void)simd;
    f32_to_bf16_scalar(src, dst, n);
}

void f16_to_f32(const std::uint16_t* src, float* dst, std::size_t n, bool simd) noexcept {
#ifdef KILN_X86
    if (simd && cpu_has_avx2_f16c()) return f16_to_f32_avx2(src, dst, n);
#endif
    (void)simd;
    f16_to_f32_scalar(src, dst, n);
}

void bf16_to_f32(const std::uint16_t* src, float* dst, std::size_t n, bool simd) noexcept {
#ifdef KILN_X86
    if (simd && cpu_has_avx2_f16c()) return bf16_to_f32_avx2(src, dst, n);
#endif
    (void)simd;
    bf16_to_f32_scalar(src, dst, n);
}

void transpose2d(const void* src, void* dst, std::size_t rows, std::size_t cols, std::size_t elem_size,
                 std::size_t c0, std::size_t c1, bool simd) noexcept {
    switch (elem_size) {
        case 1: return transpose_tiled(static_cast<const std::uint8_t*>(src), static_cast<std::uint8_t*>(dst), rows, cols, 0, rows, c0, c1);
        case 2: return transpose_tiled(static_cast<const std::uint16_t*>(src), static_cast<std::uint16_t*>(dst), rows, cols, 0, rows, c0, c1);
        case 4:
#ifdef KILN_X86
            if (simd && cpu_has_avx2_f16c()) {
                return transpose4_simd(static_cast<const std::uint32_t*>(src), static_cast<std::uint32_t*>(dst), rows, cols, c0, c1);
            }
#endif
            (void)simd;
            return transpose_tiled(static_cast<const std::uint32_t*>(src), static_cast<std::uint32_t*>(dst), rows, cols, 0, rows, c0, c1);
        case 8: return transpose_tiled(static_cast<const std::uint64_t*>(src), static_cast<std::uint64_t*>(dst), rows, cols, 0, rows, c0, c1);
        default: return;
    }
}

}  // namespace kiln
