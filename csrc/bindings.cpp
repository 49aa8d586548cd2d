// The only file that includes nanobind: argument contracts, GIL release, error translation.
// Kernels in csrc/kernels/ know nothing about Python.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/tuple.h>

#include <stdexcept>
#include <tuple>

#include "kernels/compare.h"

namespace nb = nanobind;

using F32Array = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;

static std::tuple<float, float, std::int64_t> diff_stats(F32Array ref, F32Array out, float eps) {
    if (ref.size() != out.size()) {
        throw std::invalid_argument("diff_stats: ref has " + std::to_string(ref.size()) +
                                    " elements but out has " + std::to_string(out.size()));
    }
    kiln::DiffStats s;
    {
        nb::gil_scoped_release release;
        s = kiln::diff_stats_f32(ref.data(), out.data(), ref.size(), eps);
    }
    return {s.max_abs, s.max_rel, s.nonfinite};
}

// Topic sections of this translation unit; each defines one bind_<topic>(nb::module_&).
#include "bindings_repack.inc"
#include "bindings_safetensors.inc"
#include "bindings_calib.inc"

NB_MODULE(_native, m) {
    m.doc() = "kiln's native kernels (C++). Each has a numpy twin in kiln.native.twins.";
    m.def("diff_stats", &diff_stats, nb::arg("ref").noconvert(), nb::arg("out").noconvert(),
          nb::arg("eps") = 1e-6f,
          "(max_abs, max_rel, nonfinite) of float32 arrays of equal size, C-contiguous.\n"
          "max_rel divides by max(|ref|, eps). NaN anywhere in a difference gives NaN.\n"
          "Bit-identical to kiln.native.twins.diff_stats.");
    bind_repack(m);
    bind_safetensors(m);
    bind_calib(m);
}
