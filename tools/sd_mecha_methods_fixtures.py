#!/usr/bin/env python3
"""Generate differential-test fixtures for sd-mecha 1.1.8's element-wise and per-tensor methods.

Run OFFLINE by hand (not part of CI), with torch and sd-mecha installed:

    /work/venv-mecha/bin/pip install torch sd-mecha==1.1.8
    /work/venv-mecha/bin/python tools/sd_mecha_methods_fixtures.py

It calls sd-mecha's registered merge methods through `<method>.__wrapped__(...)` on small float64
tensors (shapes [4, 6], [5] and a conv-like [3, 2, 2, 2], with zeros, negatives and equal values
at fixed positions to exercise divisions by zero and sign changes) and writes
crates/amalgam/tests/fixtures/sd_mecha_methods.json. Tensor parameters (`alpha`) are passed as
0-d float64 tensors, as sd-mecha passes them; `add_perpendicular` is sd-mecha's Python wrapper,
evaluated here as the registered methods it builds (subtract, perpendicular_component,
add_difference).

Tensors are {"shape": [...], "values": <nested lists>} (row-major); floats are written with
Python's shortest round-trip repr, so they parse back as the exact float64 sd-mecha computed.
"""

import json
import os

import numpy as np
import torch

from fixture_common import enc

import sd_mecha
from sd_mecha.extensions.builtin.merge_methods import linear as sdm_linear

try:
    from importlib.metadata import version as _pkg_version
    SD_MECHA_VERSION = _pkg_version("sd-mecha")
except Exception:  # pragma: no cover
    SD_MECHA_VERSION = getattr(sd_mecha, "__version__", "unknown")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_PATH = os.path.join(REPO_ROOT, "crates", "amalgam", "tests", "fixtures", "sd_mecha_methods.json")
DT = torch.float64
SHAPES = [(4, 6), (5,), (3, 2, 2, 2)]


def inputs(shape, seed):
    """Four tensors a, b, c, d with edge cases at fixed flat positions."""
    n = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    a, b, c, d = (np.round(rng.normal(0.0, 1.0, size=n), 3) for _ in range(4))
    a[0] = 0.0                      # a zero
    b[1] = 0.0                      # b zero
    c[2] = 0.0                      # c zero
    a[3] = b[3] = c[3] = d[3] = 0.5  # all equal
    b[4] = -a[4]                    # opposite
    if n > 5:
        c[5] = b[5]                 # b equals c
    if n > 6:
        a[6] = c[6]                 # a equals c
    if n > 7:
        a[7] = -abs(a[7]); b[7] = -abs(b[7]); c[7] = abs(c[7])  # signs differ
    return [torch.tensor(x, dtype=DT).reshape(shape) for x in (a, b, c, d)]


def close_pair(shape, seed):
    """a and a nearby b (cosine near 1), for the cosine methods."""
    n = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    a = np.round(rng.normal(0.0, 1.0, size=n), 3)
    b = np.round(a + 0.4 * rng.normal(0.0, 1.0, size=n), 3)
    b[0] = a[0]
    return [torch.tensor(x, dtype=DT).reshape(shape) for x in (a, b)]


def alpha(x):
    return torch.tensor(x, dtype=DT)


def add_perpendicular(a, b, c, alpha_):
    # sd-mecha's wrapper builds exactly these registered methods.
    da = sd_mecha.subtract.__wrapped__(a, c)
    db = sd_mecha.subtract.__wrapped__(b, c)
    perp = sd_mecha.perpendicular_component.__wrapped__(da, db)
    # the registered add_difference: a.addcmul(b, alpha), its inputs lazy mappings.
    return sdm_linear.add_difference.__wrapped__({"x": a}, {"x": perp}, alpha=alpha_, key="x")


def main():
    cases = []

    def case(method, ins, params, out, call):
        cases.append({
            "method": method,
            "inputs": [enc(t) for t in ins],
            "params": params,
            "output": enc(out),
            "sd_mecha_call": call,
        })

    for si, shape in enumerate(SHAPES):
        a, b, c, d = inputs(shape, 100 + si)
        for al in (0.5, 0.3):
            case("geometric_sum", [a, b], {"alpha": al},
                 sd_mecha.geometric_sum.__wrapped__(a, b, alpha=alpha(al)),
                 "geometric_sum.__wrapped__(a, b, alpha=tensor(alpha))")
        for al in (1.0, 0.5):
            case("multiply_quotient", [a, b, c], {"alpha": al},
                 sd_mecha.multiply_quotient.__wrapped__(a, b, c, alpha=alpha(al)),
                 "multiply_quotient.__wrapped__(a, b, c, alpha=tensor(alpha))")
        for m in ("train_difference_mask", "add_opposite_mask", "add_strict_opposite_mask"):
            fn = getattr(sd_mecha, m)
            for al in (1.0, 0.7):
                case(m, [a, b, c], {"alpha": al}, fn.__wrapped__(a, b, c, alpha=alpha(al)),
                     f"{m}.__wrapped__(a, b, c, alpha=tensor(alpha))")
        case("clamp", [a, b, c], {"stiffness": 0.0},
             sd_mecha.clamp.__wrapped__(a, b, c, stiffness=0.0),
             "clamp.__wrapped__(a, b, c, stiffness=0.0)")
        for st in (0.0, 0.5, 1.0):
            case("clamp", [a, b, c, d], {"stiffness": st},
                 sd_mecha.clamp.__wrapped__(a, b, c, d, stiffness=st),
                 "clamp.__wrapped__(a, b, c, d, stiffness=stiffness)")
        case("perpendicular_component", [a, b], {},
             sd_mecha.perpendicular_component.__wrapped__(a, b),
             "perpendicular_component.__wrapped__(a, b)")
        z = torch.zeros_like(a)
        case("perpendicular_component", [z, b], {},
             sd_mecha.perpendicular_component.__wrapped__(z, b),
             "perpendicular_component.__wrapped__(zeros, b)")
        for al in (1.0, 0.5):
            case("add_perpendicular", [a, b, c], {"alpha": al}, add_perpendicular(a, b, c, alpha(al)),
                 "add_difference(a, perpendicular_component(subtract(a, c), subtract(b, c)), alpha)")
        p, q = close_pair(shape, 200 + si)
        for m in ("add_cosine_a", "add_cosine_b"):
            fn = getattr(sd_mecha, m)
            for al in (1.0, 0.2, -0.3):
                for x, y in ((p, q), (a, b)):
                    case(m, [x, y], {"alpha": al}, fn.__wrapped__(x, y, alpha=alpha(al)),
                         f"{m}.__wrapped__(a, b, alpha=tensor(alpha))")

    doc = {
        "sd_mecha_version": SD_MECHA_VERSION,
        "torch_version": torch.__version__,
        "generator": "tools/sd_mecha_methods_fixtures.py",
        "cases": cases,
    }
    with open(OUT_PATH, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"{len(cases)} cases -> {OUT_PATH} ({os.path.getsize(OUT_PATH)} bytes)")


if __name__ == "__main__":
    main()
