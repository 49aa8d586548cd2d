// Element repacking: float casts (fp32 <-> fp16 / bf16) and 2-D transpose.
// Kernel rules (see /work/shared/design/ARCHITECTURE.md): raw pointers and sizes in, no allocation,
// no I/O, noexcept. Each has a numpy twin in kiln.native.twins; results are bit-identical to it.
//
// `simd` picks the AVX2+F16C path when the CPU has it (checked at run time, so the module still runs
// on an older x86-64 or another architecture); false forces the portable scalar path. Both paths give
// the same bits: tests run both.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {

// True when this CPU (and build) can run the AVX2+F16C paths.
bool simd_supported() noexcept;

// fp32 -> IEEE binary16, round to nearest even: subnormals exact, |x| >= 65520 -> +-Inf, -0.0 kept.
// Every NaN becomes the quiet NaN sign | 0x7E00 (the payload is dropped, the sign kept).
void f32_to_f16(const float* src, std::uint16_t* dst, std::size_t n, bool simd) noexcept;

// fp32 -> bfloat16, round to nearest even: (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16.
// Every NaN becomes the quiet NaN sign | 0x7FC0.
void f32_to_bf16(const float* src, std::uint16_t* dst, std::size_t n, bool simd) noexcept;

// binary16 -> fp32, exact. A NaN keeps its sign and payload and comes out quiet (bit 22 set),
// as the F16C instruction does: sign | 0x7FC00000 | (mantissa << 13).
void f16_to_f32(const std::uint16_t* src, float* dst, std::size_t n, bool simd) noexcept;

// bfloat16 -> fp32, exact: bits << 16 (NaN payloads, signalling or not, are kept as they are).
void bf16_to_f32(const std::uint16_t* src, float* dst, std::size_t n, bool simd) noexcept;

// dst[c][r] = src[r][c] for a row-major src of rows x cols and a row-major dst of cols x rows, for
// the dst rows c in [c0, c1) only (threads take disjoint ranges of dst rows, so each thread writes
// one contiguous part of dst). elem_size is 1, 2, 4 or 8 bytes; any other size does nothing.
// (4-byte elements have an AVX2 path; it only moves bits, like the scalar one.)
void transpose2d(const void* src, void* dst, std::size_t rows, std::size_t cols, std::size_t elem_size,
                 std::size_t c0, std::size_t c1, bool simd) noexcept;

}  // namespace kiln
