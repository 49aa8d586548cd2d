#include "kernels/safetensors.h"

namespace kiln {

namespace {

constexpr std::uint64_t kMaxIndex = 0x7fffffffffffffffULL;  // numpy's intp

// Byte size of a tensor, or a failed rule. The product of the non-zero dims (and that times the
// item size) must fit numpy's signed 64-bit index even when another dim is 0 (numpy refuses shape [2**63, 0]), so zeros are
// set aside rather than allowed to hide an overflow.
LayoutRule tensor_bytes(std::uint64_t itemsize, std::uint64_t ndim, const std::uint64_t* dims,
                        std::uint64_t* out) noexcept {
    std::uint64_t nonzero_product = 1;
    bool empty = false;
    for (std::uint64_t d = 0; d < ndim; ++d) {
        if (dims[d] == 0) {
            empty = true;
            continue;
        }
        if (__builtin_mul_overflow(nonzero_product, dims[d], &nonzero_product) || nonzero_product > kMaxIndex) {
            return LayoutRule::shape_overflow;
        }
    }
    // numpy also checks the non-zero product times the item size, empty or not.
    std::uint64_t span = 0;
    if (__builtin_mul_overflow(nonzero_product, itemsize, &span) || span > kMaxIndex) return LayoutRule::size_overflow;
    *out = empty ? 0 : span;
    return LayoutRule::ok;
}

}  // namespace

LayoutCheck check_layout(std::size_t n, const std::uint64_t* itemsizes, const std::uint64_t* ndims,
                         const std::uint64_t* dims, std::size_t n_dims, const std::uint64_t* begins,
                         const std::uint64_t* ends, const std::int64_t* order,
                         std::uint64_t buffer_len) noexcept {
    // Per tensor in index order: its own arithmetic (dims are concatenated in index order).
    std::size_t dims_at = 0;
    for (std::size_t i = 0; i < n; ++i) {
        if (ndims[i] > n_dims - dims_at) return {LayoutRule::shape_overflow, std::int64_t(i)};
        std::uint64_t nbytes = 0;
        const LayoutRule rule = tensor_bytes(itemsizes[i], ndims[i], dims + dims_at, &nbytes);
        dims_at += ndims[i];
        if (rule != LayoutRule::ok) return {rule, std::int64_t(i)};
        if (begins[i] > ends[i]) return {LayoutRule::begin_after_end, std::int64_t(i)};
        if (ends[i] - begins[i] != nbytes) return {LayoutRule::size_mismatch, std::int64_t(i)};
        if (ends[i] > buffer_len) return {LayoutRule::past_end, std::int64_t(i)};
    }
    // Across tensors in offset order: contiguous from 0 to exactly buffer_len.
    std::uint64_t expected = 0;
    for (std::size_t k = 0; k < n; ++k) {
        const std::int64_t i = order[k];
        if (i < 0 || std::uint64_t(i) >= n) return {LayoutRule::not_sorted, -1};
        if (k > 0 && begins[i] < begins[order[k - 1]]) return {LayoutRule::not_sorted, i};
        if (begins[i] < expected) return {LayoutRule::overlap, i};
        if (begins[i] > expected) return {k == 0 ? LayoutRule::not_at_start : LayoutRule::hole, i};
        expected = ends[i];
    }
    if (expected != buffer_len) return {LayoutRule::trailing_bytes, -1};
    return {LayoutRule::ok, -1};
}

}  // namespace kiln
