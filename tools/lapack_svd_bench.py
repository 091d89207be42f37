#!/usr/bin/env python3
"""Time numpy/LAPACK SVDs of the ISO-C task-vector sums of a model pool.

A yardstick for amalgam's iso_c / iso_z / iso_cts SVD cost: for every key that
is a 2-D matrix (with --flatten also every tensor of more than 2 dimensions,
reshaped to [shape0, rest]; keys ending in `text_projection` or
`text_projection.weight` are skipped, as amalgam and the ISO paper do), the
task vectors (model - base) are summed in float64 and
numpy.linalg.svd(sum, full_matrices=False) is timed.  Only the SVD calls are
timed (reading, converting and summing are not), summed over keys.

Run it OFFLINE by hand (not part of CI) with any Python that has numpy and
safetensors, e.g.

    python3 -m venv /work/venv-mecha
    /work/venv-mecha/bin/pip install numpy safetensors
    amalgam synth -o /tmp/pool --layout sdxl -n 2 --shrink 8
    /work/venv-mecha/bin/python tools/lapack_svd_bench.py \\
        --base /tmp/pool/base.safetensors /tmp/pool/m000.safetensors /tmp/pool/m001.safetensors \\
        [--flatten] [--threads N] [--verbose]

--threads N sets OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS /
BLIS_NUM_THREADS / VECLIB_MAXIMUM_THREADS before numpy is imported.

Tensors are read with the safetensors numpy API (safe_open(framework="np"));
BF16 tensors, which numpy cannot represent, are decoded from the raw file bytes
(upper 16 bits of an f32).  Non-float keys (e.g. int64 position_ids) are
skipped.

Output: the number of matrices, their total elements, the total SVD seconds,
and one line describing numpy's BLAS/LAPACK (threadpoolctl when installed,
else numpy.show_config(mode="dicts")).
"""

import argparse
import json
import os
import struct
import sys
import time


def parse_args():
    ap = argparse.ArgumentParser(description="Time numpy SVDs of summed task vectors.")
    ap.add_argument("--base", required=True, help="base model (.safetensors)")
    ap.add_argument("models", nargs="+", help="fine-tuned models (.safetensors)")
    ap.add_argument("--flatten", action="store_true",
                    help="also treat >2-D tensors as [shape0, rest] matrices")
    ap.add_argument("--threads", type=int, help="BLAS/LAPACK threads (set before numpy is imported)")
    ap.add_argument("--verbose", action="store_true", help="print one line per key")
    ap.add_argument("--per-shape", type=int, metavar="K",
                    help="time only the first K matrices of each distinct shape and estimate the "
                         "total as their mean time times the number of matrices of that shape "
                         "(for full-size models, where every SVD takes tens of minutes)")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.threads is not None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402  (after the thread variables)
from safetensors import safe_open  # noqa: E402

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class Reader:
    """safetensors numpy reader with a raw fallback for BF16."""

    def __init__(self, path):
        self.path = path
        self.header, self.data_start = read_header(path)
        self.handle = safe_open(path, framework="np")

    def dtype(self, key):
        return self.header[key]["dtype"]

    def shape(self, key):
        return tuple(self.header[key]["shape"])

    def get_f64(self, key):
        info = self.header[key]
        if info["dtype"] == "BF16":
            start, end = info["data_offsets"]
            with open(self.path, "rb") as f:
                f.seek(self.data_start + start)
                raw = np.frombuffer(f.read(end - start), dtype="<u2")
            return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64).reshape(info["shape"])
        return self.handle.get_tensor(key).astype(np.float64)


def matrix_shape(key, shape, flatten):
    if key.endswith("text_projection") or key.endswith("text_projection.weight"):
        return None
    if any(d == 0 for d in shape):
        return None
    if len(shape) == 2:
        return shape
    if len(shape) > 2 and flatten:
        return shape[0], int(np.prod(shape[1:]))
    return None


def blas_line():
    try:
        from threadpoolctl import threadpool_info
        parts = []
        for p in threadpool_info():
            parts.append(f"{p.get('internal_api')} {p.get('version')} ({p.get('user_api')}, "
                         f"threading={p.get('threading_layer')}, arch={p.get('architecture')}, "
                         f"threads={p.get('num_threads')}, {os.path.basename(p.get('filepath', ''))})")
        if parts:
            return "threadpoolctl: " + "; ".join(parts)
    except ImportError:
        pass
    try:
        cfg = np.show_config(mode="dicts")
        deps = cfg.get("Build Dependencies", {})
        out = []
        for name in ("blas", "lapack"):
            d = deps.get(name, {})
            extra = d.get("openblas configuration", "")
            out.append(f"{name}={d.get('name')} {d.get('version')}" + (f" [{extra}]" if extra else ""))
        simd = cfg.get("SIMD Extensions", {})
        if simd:
            out.append("simd=" + ",".join(simd.get("found", []) or []))
        return "numpy.show_config: " + "; ".join(out)
    except Exception as e:  # noqa: BLE001
        return f"numpy config unavailable ({type(e).__name__}: {e})"


def main():
    base = Reader(ARGS.base)
    models = [Reader(p) for p in ARGS.models]
    n_mat = 0
    n_elem = 0
    svd_s = 0.0
    skipped = 0
    timed_per_shape = {}  # shape -> [seconds...]
    count_per_shape = {}
    for key in base.header:
        if base.dtype(key) not in FLOAT_DTYPES:
            skipped += 1
            continue
        shape = base.shape(key)
        mat = matrix_shape(key, shape, ARGS.flatten)
        if mat is None:
            continue
        present = [m for m in models if key in m.header]
        if not present:
            skipped += 1
            continue
        count_per_shape[mat] = count_per_shape.get(mat, 0) + 1
        if ARGS.per_shape is not None and len(timed_per_shape.get(mat, [])) >= ARGS.per_shape:
            n_mat += 1
            n_elem += int(np.prod(mat))
            continue
        b = base.get_f64(key)
        acc = np.zeros_like(b)
        for m in present:
            if m.shape(key) != shape:
                raise SystemExit(f"{key}: shape {m.shape(key)} in {m.path} != {shape} in base")
            acc += m.get_f64(key) - b
        acc = np.ascontiguousarray(acc.reshape(mat))
        t0 = time.perf_counter()
        np.linalg.svd(acc, full_matrices=False)
        dt = time.perf_counter() - t0
        svd_s += dt
        timed_per_shape.setdefault(mat, []).append(dt)
        n_mat += 1
        n_elem += acc.size
        if ARGS.verbose:
            print(f"{key} {mat[0]}x{mat[1]} {dt:.4f}s")
    if ARGS.per_shape is not None:
        estimate = sum(sum(t) / len(t) * count_per_shape[m] for m, t in timed_per_shape.items())
        timed = sum(len(t) for t in timed_per_shape.values())
        print(f"per-shape estimate: {estimate:.3f} s for all {n_mat} matrices "
              f"({len(timed_per_shape)} shapes, {timed} timed, their SVDs {svd_s:.3f} s)")
        if ARGS.verbose:
            for m, t in sorted(timed_per_shape.items(), key=lambda x: -count_per_shape[x[0]]):
                print(f"  {m[0]}x{m[1]}: {count_per_shape[m]} matrices, {sum(t) / len(t):.4f} s each")
    print(f"matrices: {n_mat}")
    print(f"elements: {n_elem}")
    print(f"svd_seconds: {svd_s:.3f}")
    print(f"threads: {ARGS.threads if ARGS.threads is not None else 'default'}; flatten: {ARGS.flatten}; "
          f"models: {len(models)}; skipped non-float/missing keys: {skipped}")
    print(f"blas: {blas_line()}")


if __name__ == "__main__":
    sys.exit(main())
