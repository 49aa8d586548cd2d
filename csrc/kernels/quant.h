// Weight quantization: int8 (per tensor / per channel) and blockwise int4 for onnxruntime's
// com.microsoft MatMulNBits. Kernel rules: raw pointers and sizes, no allocation, no I/O, noexcept.
// The numpy twins in kiln.native.twins define every result; all arithmetic here is float32 in the
// same order as there, so the bytes agree. `simd` as in repack.h (AVX2 when the CPU has it).
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {

// ---------------- int8 ----------------
// Quantized values and zero points are stored as bytes: two's complement for int8 (qmin < 0),
// plain for uint8. Quantization is ONNX QuantizeLinear's:
//   q = clamp(rint(x / scale) + zp, qmin, qmax), rint = round half to even; x / scale NaN counts as 0.
// Range -> (scale, zp), with mn = min(min(x), 0), mx = max(max(x), 0), NaNs ignored:
//   symmetric  (int8, zp 0, qmin -127 qmax 127): scale = max(-mn, mx) / 127
//   asymmetric (ONNX DynamicQuantizeLinear):     scale = (mx - mn) / (qmax - qmin),
//                                                zp = clamp(rint(qmin - mn / scale), qmin, qmax), NaN -> qmin
//   a zero scale (all zeros) becomes 1.0f, so q = zp and dequantization gives exact zeros.

struct MinMax {
    float min;  // +Inf when there is no non-NaN value
    float max;  // -Inf when there is no non-NaN value
};

// min and max of x[0..n), NaNs ignored.
MinMax minmax_f32(const float* x, std::size_t n, bool simd) noexcept;

// Running column-wise min/max: for a row-major block of rows x cols with row stride ld,
// mins[c] = min(mins[c], x[r][c]) over all r (same for maxs); NaNs ignored.
void minmax_cols_f32(const float* x, std::size_t rows, std::size_t cols, std::size_t ld, float* mins, float* maxs,
                     bool simd) noexcept;

// (scale, zp byte) from a range, as described above.
void int8_params(float mn, float mx, bool symmetric, int qmin, int qmax, float* scale, std::uint8_t* zp) noexcept;

// Quantizes a row-major rows x cols block. Element (r, c) uses scales[r * s_row + c * s_col] and the
// zero point at the same index: s_row = s_col = 0 per tensor, (1, 0) one per row, (0, 1) one per column.
void quantize_int8(const float* x, std::size_t rows, std::size_t cols, const float* scales, const std::uint8_t* zps,
                   std::size_t s_row, std::size_t s_col, int qmin, int qmax, std::uint8_t* q, bool simd) noexcept;

// One scale per row, fused: range, params and quantization of each row while it is in cache.
void quantize_int8_rows(const float* x, std::size_t rows, std::size_t cols, bool symmetric, int qmin, int qmax,
                        float* scales, std::uint8_t* zps, std::uint8_t* q, bool simd) noexcept;

// out = (q - zp) * scale in float32, indexing scales/zps as in quantize_int8.
void dequantize_int8(const std::uint8_t* q, bool is_signed, std::size_t rows, std::size_t cols, const float* scales,
                     const std::uint8_t* zps, std::size_t s_row, std::size_t s_col, float* out, bool simd) noexcept;

// ---------------- int4, MatMulNBits layout ----------------
// W is float32 [K, N] row-major (MatMul's B). For each column n and block b of block_size rows
// (the last block zero-padded), following onnxruntime's MLAS blockwise quantizer so the bytes match
// its quantize_matmul_4bits:
//   mn = min(min(block), 0), mx = max(max(block), 0), NaNs ignored
//   asymmetric: scale = (mx - mn) / 15, zpf = scale != 0 ? 0 - mn / scale : mn,
//               zp = zpf > 0 ? (zpf < 15 ? round(zpf) : 15) : 0            (NaN -> 0)
//   symmetric:  m = |mx| > |mn| ? mx : mn, scale = -m / 8, zp = 8 (implicit, not stored)
//   r = scale != 0 ? 1 / scale : 0;  q = round(clamp(x * r + zp, 0, 15)), NaN -> 0
//   round = half away from zero (C roundf). Padding nibbles (k >= K) are 0.
// Outputs for the columns n in [n0, n1) (threads take disjoint column ranges):
//   B [N, n_blocks, block_size / 2]: the lower k in the low nibble
//   scales [N, n_blocks]
//   zero_points [N, ceil(n_blocks / 2)]: block 2j low nibble, 2j+1 high; an odd count pads with 8.
//     Ignored (may be null) when symmetric.
// block_size is a power of two in [16, 256].
void quantize_int4_matmulnbits(const float* w, std::size_t K, std::size_t N, std::size_t block_size, bool symmetric,
                               std::size_t n0, std::size_t n1, std::uint8_t* B, float* scales,
                               std::uint8_t* zero_points, bool simd) noexcept;

}  // namespace kiln
