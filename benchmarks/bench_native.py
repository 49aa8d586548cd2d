"""Every native-core benchmark in one run: SafeTensors load/save against the safetensors package
(512 MiB and 1 GiB unless --mib), then casts and int8/int4 packing against numpy (and onnxruntime),
with memcpy as the ceiling.

    python benchmarks/bench_native.py [--mib 1024] [--repeat 7] [--settle 3]
"""

from __future__ import annotations

import argparse
import sys

import bench_repack
import bench_safetensors

if __name__ == "__main__":
    bench_safetensors.main()
    # --settle is bench_safetensors' own: bench_repack's parser would refuse it
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--settle")
    sys.argv = [sys.argv[0], *own.parse_known_args()[1]]
    bench_repack.main()
