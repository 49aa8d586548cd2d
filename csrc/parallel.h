// A small parallel_for for binding code (kernels stay single-threaded and know nothing of threads).
#pragma once
#include <algorithm>
#include <cstddef>
#include <thread>
#include <vector>

namespace kiln {

// Work below this many elements runs on the calling thread: starting threads costs tens of
// microseconds, more than the work saves.
constexpr std::size_t kParallelMinElements = std::size_t{1} << 20;

// Calls fn(begin, end) on disjoint, contiguous chunks that cover [0, n), one chunk per hardware thread,
// when n * elements_per_item >= kParallelMinElements; otherwise fn(0, n) on this thread.
// Chunk bounds are multiples of `align` (except n itself), so threads never share an output byte or
// cache line when align is chosen for that. Each thread writes its own chunk first, so the pages of a
// fresh output are first touched (faulted in) by the threads in parallel.
// fn must not throw (it calls noexcept kernels). If a thread cannot be started, its chunk runs here.
template <class Fn>
void parallel_for(std::size_t n, std::size_t elements_per_item, std::size_t align, Fn&& fn) {
    align = std::max<std::size_t>(align, 1);
    const std::size_t units = (n + align - 1) / align;
    const std::size_t hw = std::max(1u, std::thread::hardware_concurrency());
    const std::size_t parts = n * elements_per_item >= kParallelMinElements ? std::min(hw, units) : 1;
    if (parts <= 1) {
        fn(std::size_t{0}, n);
        return;
    }
    auto bound = [&](std::size_t i) { return std::min(n, units * i / parts * align); };
    std::vector<std::thread> workers;
    workers.reserve(parts - 1);
    for (std::size_t i = 1; i < parts; ++i) {
        try {
            workers.emplace_back(fn, bound(i), bound(i + 1));
        } catch (...) {
            fn(bound(i), bound(i + 1));
        }
    }
    fn(std::size_t{0}, bound(1));
    for (auto& t : workers) t.join();
}

}  // namespace kiln
