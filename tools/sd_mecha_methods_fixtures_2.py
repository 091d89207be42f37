#!/usr/bin/env python3
"""Differential-test fixtures for more of sd-mecha 1.1.8's methods: tensor_sum,
top_k_tensor_sum, the copy_region and n_model_stock wrappers, crossover and truncate_kronecker.

Run OFFLINE by hand (not part of CI), with torch and sd-mecha installed:

    /work/venv-mecha/bin/pip install torch sd-mecha==1.1.8
    /work/venv-mecha/bin/python tools/sd_mecha_methods_fixtures_2.py

It calls sd-mecha's registered merge methods (from their modules: `sd_mecha.tensor_sum` is
the copy_region wrapper) through `<method>.__wrapped__(...)` on small float64
tensors and writes crates/amalgam/tests/fixtures/sd_mecha_methods_2.json (the format of
tools/sd_mecha_methods_fixtures.py: {"shape", "values"} row-major, floats in shortest
round-trip repr). The wrappers (`copy_region` with c, `n_model_stock`) are evaluated as the
registered methods they build (subtract, tensor_sum / top_k_tensor_sum / model_stock,
add_difference).

crossover builds its filter with `torch.linspace` in torch's default dtype (float32): each
crossover case also records `output_f64_filter`, the same call with the default dtype set to
float64, which amalgam's f64 filter must match to rounding (`output` to float32's).
truncate_kronecker is called with use_approximate_basis=False (the exact SVD); amalgam's
randomized default is tested against it.
"""

import json
import os

import numpy as np
import torch

from fixture_common import enc

import sd_mecha
import importlib
from sd_mecha.extensions.builtin.merge_methods import kronecker as sdm_kronecker
from sd_mecha.extensions.builtin.merge_methods import linear as sdm_linear
from sd_mecha.extensions.builtin.merge_methods import slicing as sdm_slicing
from sd_mecha.extensions.builtin.merge_methods import ties as sdm_ties

# The module, not the method of the same name the package exports.
sdm_crossover = importlib.import_module("sd_mecha.extensions.builtin.merge_methods.crossover")

try:
    from importlib.metadata import version as _pkg_version
    SD_MECHA_VERSION = _pkg_version("sd-mecha")
except Exception:  # pragma: no cover
    SD_MECHA_VERSION = getattr(sd_mecha, "__version__", "unknown")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_PATH = os.path.join(REPO_ROOT, "crates", "amalgam", "tests", "fixtures", "sd_mecha_methods_2.json")
DT = torch.float64


def inputs(shape, seed, k=4):
    """k tensors with a zero, equal values across them, and ties within each (stable ranks)."""
    n = int(np.prod(shape)) if len(shape) else 1
    rng = np.random.default_rng(seed)
    xs = [np.round(rng.normal(0.0, 1.0, size=n), 3) for _ in range(k)]
    xs[0][0] = 0.0
    if n > 3:
        for x in xs:
            x[3] = 0.5
    for x in xs:
        if n > 9:
            x[9] = x[8]          # a tie within the tensor
        if n > 11:
            x[11] = -x[10]       # equal magnitudes
    return [torch.tensor(x, dtype=DT).reshape(shape) for x in xs]


def sub(a, b):
    return sdm_linear.subtract.__wrapped__(a, b)


def add_diff(a, b, alpha=1.0):
    # the registered add_difference (a + alpha·b), its inputs lazy mappings.
    return sdm_linear.add_difference.__wrapped__({"x": a}, {"x": b}, alpha=torch.tensor(alpha, dtype=DT), key="x")


def main():
    cases = []

    def case(method, ins, params, out, call, **extra):
        c = {
            "method": method,
            "inputs": [enc(t) for t in ins],
            "params": params,
            "output": enc(out),
            "sd_mecha_call": call,
        }
        for k, v in extra.items():
            c[k] = enc(v)
        cases.append(c)

    shapes = [(4, 6), (5,), (3, 2, 2, 2), (7, 3)]
    regions = [(0.5, 0.0), (0.3, 0.2), (0.5, 0.75), (-0.25, 0.5), (1.0, 0.0), (0.7, -0.4), (0.0, 0.3)]
    for si, shape in enumerate(shapes):
        a, b, c, d = inputs(shape, 300 + si)
        for w, o in regions:
            case("tensor_sum", [a, b], {"width": w, "offset": o},
                 sdm_slicing.tensor_sum.__wrapped__(a.clone(), b.clone(), width=w, offset=o),
                 "tensor_sum.__wrapped__(a, b, width, offset)")
            case("top_k_tensor_sum", [a, b], {"width": w, "offset": o},
                 sdm_slicing.top_k_tensor_sum.__wrapped__(a.clone(), b.clone(), width=w, offset=o),
                 "top_k_tensor_sum.__wrapped__(a, b, width, offset)")
        for (w, o) in [(1.0, 0.0), (0.4, 0.3), (0.6, 0.7)]:
            for top_k in (False, True):
                fn = sdm_slicing.top_k_tensor_sum if top_k else sdm_slicing.tensor_sum
                res = fn.__wrapped__(sub(a, c), sub(b, c), width=w, offset=o)
                case("copy_region", [a, b, c], {"width": w, "offset": o, "top_k": top_k},
                     add_diff(c, res),
                     "add_difference(c, [top_k_]tensor_sum(subtract(a, c), subtract(b, c), width, offset), alpha=1)")
    # 0-d keys: b when width > 0.5.
    a0, b0 = torch.tensor(1.5, dtype=DT), torch.tensor(-2.0, dtype=DT)
    for w in (0.7, 0.5):
        case("tensor_sum", [a0, b0], {"width": w, "offset": 0.0},
             sdm_slicing.tensor_sum.__wrapped__(a0.clone(), b0.clone(), width=w, offset=0.0),
             "tensor_sum.__wrapped__(a, b, width, offset) of 0-d tensors")

    # crossover
    xshapes = [(4, 6), (5,), (8,), (3, 2, 2, 2), (6, 5), (3, 4, 5), (2, 1, 3)]
    for si, shape in enumerate(xshapes):
        a, b = inputs(shape, 400 + si, 2)
        for al, tilt in [(0.3, 0.0), (0.55, 0.0), (0.8, 2.0), (0.3, 0.5), (0.6, 0.25), (0.45, 1.5),
                         (0.7, 3.0), (0.35, 3.5), (0.5, 5.0), (0.4, -1.0), (0.5, 1.0), (0.0, 0.3), (1.0, 0.3)]:
            out = sdm_crossover.crossover.__wrapped__(a, b, alpha=al, tilt=tilt)
            torch.set_default_dtype(torch.float64)
            try:
                out64 = sdm_crossover.crossover.__wrapped__(a, b, alpha=al, tilt=tilt)
            finally:
                torch.set_default_dtype(torch.float32)
            case("crossover", [a, b], {"alpha": al, "tilt": tilt}, out,
                 "crossover.__wrapped__(a, b, alpha, tilt)", output_f64_filter=out64)
    a, _ = inputs((4, 6), 450, 2)
    near = a + 1e-9
    case("crossover", [a, near], {"alpha": 0.3, "tilt": 0.0},
         sdm_crossover.crossover.__wrapped__(a, near, alpha=0.3, tilt=0.0),
         "crossover.__wrapped__(a, a + 1e-9, alpha, tilt): allclose, so lerp")

    # n_model_stock
    for si, shape in enumerate([(4, 6), (5,), (3, 2, 2, 2)]):
        base, m1, m2, m3 = inputs(shape, 500 + si)
        for models in ((m1, m2), (m1, m2, m3)):
            for cos_eps in (1e-6, 0.5):
                deltas = [sub(m, base) for m in models]
                res = sdm_ties.model_stock.__wrapped__(*deltas, cos_eps=cos_eps)
                case("n_model_stock", [base, *models], {"cos_eps": cos_eps}, add_diff(base, res),
                     "add_difference(base, model_stock(*(subtract(m, base) for m in models), cos_eps), alpha=1)")

    # truncate_kronecker (exact SVD)
    for si, shape in enumerate([(4, 6), (6, 4), (8, 6), (4, 6, 2, 2), (5,), (7, 5), (4, 4)]):
        (a,) = inputs(shape, 600 + si, 1)
        for ratio in (0.5, 0.0, 1.0, 0.3, 0.8):
            out = sdm_kronecker.truncate_kronecker.__wrapped__(
                a, kronecker_ratio=ratio, use_approximate_basis=False,
                approximate_basis_iters=2, approximate_basis_seed=None, key="x")
            case("truncate_kronecker", [a], {"kronecker_ratio": ratio, "svd": "exact"}, out,
                 "truncate_kronecker.__wrapped__(a, kronecker_ratio, use_approximate_basis=False)")

    doc = {
        "sd_mecha_version": SD_MECHA_VERSION,
        "torch_version": torch.__version__,
        "generator": "tools/sd_mecha_methods_fixtures_2.py",
        "cases": cases,
    }
    with open(OUT_PATH, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"{len(cases)} cases -> {OUT_PATH} ({os.path.getsize(OUT_PATH)} bytes)")


if __name__ == "__main__":
    main()
