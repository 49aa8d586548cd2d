"""Fake cuda.bindings.utils: get_cuda_native_handle, which cuda-bindings 13 asks for instead of int(obj).
Like the real one it knows only the bindings' own types and raises TypeError("Unknown type: ...") for others."""

from cuda.bindings.runtime import cudaStream_t, state


def get_cuda_native_handle(obj) -> int:
    if type(obj) is not cudaStream_t:
        raise TypeError("Unknown type: " + str(type(obj)))
    state.native_handle_calls += 1
    return obj.getPtr()
