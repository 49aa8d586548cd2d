// SafeTensors layout rules over a header already parsed into flat arrays (Python parses the JSON;
// this checks the arithmetic, where a hostile file can overflow or point outside the buffer).
// Kernel rules: raw pointers and sizes in, no allocation, no I/O.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {

enum class LayoutRule : std::int32_t {
    ok = 0,
    shape_overflow = 1,   // product of dims overflows 64 bits
    size_overflow = 2,    // element count * item size overflows 64 bits
    begin_after_end = 3,  // data_offsets [b, e] with b > e
    size_mismatch = 4,    // e - b differs from the size the dtype and shape need
    not_at_start = 5,     // the first tensor (by offset) does not start at byte 0
    hole = 6,             // a gap between one tensor's end and the next one's begin
    overlap = 7,          // a tensor begins before the previous one ends
    not_sorted = 8,       // `order` does not list tensors by ascending begin
    past_end = 9,         // a tensor ends after the end of the file
    trailing_bytes = 10,  // bytes after the last tensor: offsets must cover the buffer exactly
};

struct LayoutCheck {
    LayoutRule rule;
    std::int64_t tensor;  // index (into the input arrays) of the offending tensor, or -1
};

// n tensors. itemsizes[i]: bytes per element; ndims[i]: rank; dims: all shapes concatenated in
// index order; begins/ends: data_offsets; order: tensor indices sorted by begin (ties by end).
// buffer_len: bytes after the header. Checks in `order`, stops at the first violation.
LayoutCheck check_layout(std::size_t n, const std::uint64_t* itemsizes, const std::uint64_t* ndims,
                         const std::uint64_t* dims, std::size_t n_dims, const std::uint64_t* begins,
                         const std::uint64_t* ends, const std::int64_t* order,
                         std::uint64_t buffer_len) noexcept;

}  // namespace kiln
