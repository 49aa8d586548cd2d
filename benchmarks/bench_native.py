"""Every native-core benchmark in one run: SafeTensors load/save against the safetensors package,
then casts and int8/int4 packing against numpy (and onnxruntime), with memcpy as the ceiling.

    python benchmarks/bench_native.py [--mib 1024] [--repeat 3]
"""

from __future__ import annotations

import bench_repack
import bench_safetensors

if __name__ == "__main__":
    bench_safetensors.main()
    bench_repack.main()
