// An AVX2 8x8 register transpose of 4-byte elements, shared by the transpose kernel (repack.cpp)
// and the int4 packer (quant.cpp, which reads weight columns). Header-only so each caller inlines it.
#pragma once
#include <cstddef>
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

namespace kiln {
namespace simd {

// 8 rows of 8 4-byte elements (row stride ld) -> 8 rows of 8 (row stride ldd), in registers.
// Stream: non-temporal stores (dst rows 32-byte aligned).
template <bool Stream>
__attribute__((target("avx2"))) inline void transpose8x8_u32(const std::uint32_t* src, std::size_t ld, std::uint32_t* dst,
                                                             std::size_t ldd) noexcept {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(src + i * ld));
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 8; ++i) {
        const __m256 v = _mm256_permute2f128_ps(r[i % 4], r[i % 4 + 4], i < 4 ? 0x20 : 0x31);
        float* out = reinterpret_cast<float*>(dst + i * ldd);
        if (Stream) {
            _mm256_stream_ps(out, v);
        } else {
            _mm256_storeu_ps(out, v);
        }
    }
}

}  // namespace simd
}  // namespace kiln
#endif
