#!/usr/bin/env python3
"""Differential-test fixtures for the mergekit 0.1.5 methods amalgam implements under mergekit's
names (issue #18).

Run OFFLINE by hand (not part of CI), with mergekit 0.1.5 and torch installed:

    python3 -m venv /work/venv-mk
    /work/venv-mk/bin/pip install mergekit==0.1.5     # or torch from elsewhere + --no-deps
    /work/venv-mk/bin/python tools/mergekit_methods_fixtures.py

It calls mergekit's registered merge methods themselves (`registry.get(name)([TensorGroup],
parameters=...)`, the tensor-level API: no model files, no planner) on small float64 tensors and
writes crates/amalgam/tests/fixtures/mergekit_methods.json.

Each case holds the mergekit method and parameters it was computed with, the amalgam method and
parameters that mean the same (the mapping is written here, once), the inputs (base first when
the method has one) and mergekit's output. Values are rounded to 3 decimals and distinct in
float32, since mergekit sorts magnitudes in float32 on the CPU (no ties at a threshold).

Random methods (DARE, DELLA masks) cannot agree draw for draw (mergekit draws from torch's global
generator): the `random` section holds mergekit's statistics over many elements and seeds (the
kept fraction, the kept fraction by magnitude-rank fifth within rows for DELLA, the L1 rescale
factor), which the Rust test compares with amalgam's own.
"""

import json
import os

import numpy as np
import torch

from fixture_common import enc

from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup

try:
    from importlib.metadata import version as _v

    MERGEKIT_VERSION = _v("mergekit")
except Exception:  # pragma: no cover
    MERGEKIT_VERSION = "unknown"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_PATH = os.path.join(
    REPO_ROOT, "crates", "amalgam", "tests", "fixtures", "mergekit_methods.json"
)
DT = torch.float64


def distinct(n, rng, scale=1.0):
    """n values rounded to 3 decimals with distinct magnitudes (no ties at a threshold)."""
    while True:
        x = np.round(rng.normal(0.0, scale, size=n), 3)
        mags = np.abs(x).astype(np.float32)
        if len(set(mags.tolist())) == n and np.all(mags > 0):
            return x


def tensors(shape, count, seed, delta_scale=0.5):
    """A base and `count` fine-tunes near it (their deltas distinct in magnitude)."""
    n = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    base = np.round(rng.normal(0.0, 1.0, size=n), 3)
    out = [torch.tensor(base, dtype=DT).reshape(shape)]
    for _ in range(count):
        d = distinct(n, rng, delta_scale)
        out.append(torch.tensor(base + d, dtype=DT).reshape(shape))
    return out


def run(name, ts, params, base_index=0):
    group = TensorGroup.from_tensors(ts, base_index=base_index)
    return registry.get(name)([group], parameters=params)[0]


def per(values, first=1):
    """A per-model mergekit parameter for the inputs first, first + 1, ..."""
    return {first + i: v for i, v in enumerate(values)}


CASES = []


def case(mk, mk_params, inputs, out, amalgam, am_params, note=""):
    CASES.append(
        {
            "mergekit": mk,
            "mergekit_params": {
                k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()})
                for k, v in mk_params.items()
            },
            "method": amalgam,
            "params": am_params,
            "inputs": [enc(t) for t in inputs],
            "output": enc(out),
            "note": note,
        }
    )


# --- The generalized task arithmetic family (deterministic cases) -------------------------------

SHAPES = [(4, 6), (7,), (3, 2, 5)]
W3 = [1.0, 0.5, 2.0]

for si, shape in enumerate(SHAPES):
    ts = tensors(shape, 3, 100 + si)
    # ties: top-k trim, mass election (ties to +), weighted disjoint mean.
    for density in (0.5, 0.3):
        for normalize in (True, False):
            p = {"weight": per(W3), "density": per([density] * 3), "normalize": normalize}
            out = run("ties", ts, p)
            case("ties", p, ts, out, "ties",
                 {"weights": W3, "density": density, "trim": "top_k", "sign_tie": "positive",
                  "normalize": normalize})
    p = {"weight": per(W3), "density": per([0.5] * 3), "lambda": 0.7, "rescale": True,
         "int8_mask": True}
    out = run("ties", ts, p)
    case("ties", p, ts, out, "ties",
         {"weights": W3, "density": 0.5, "trim": "top_k", "sign_tie": "positive",
          "lambda": 0.7, "rescale": "l1", "int8_mask": True})
    # breadcrumbs and breadcrumbs_ties: drop the gamma largest and the smallest.
    for gamma in (0.1, 0.2):
        for density in (0.6, 0.4):
            p = {"weight": per(W3), "density": per([density] * 3), "gamma": per([gamma] * 3)}
            out = run("breadcrumbs", ts, p)
            case("breadcrumbs", p, ts, out, "breadcrumbs",
                 {"weights": W3, "density": density, "gamma": gamma})
            out = run("breadcrumbs_ties", ts, p)
            case("breadcrumbs_ties", p, ts, out, "breadcrumbs_ties",
                 {"weights": W3, "density": density, "gamma": gamma})
    # k + gamma > 1: fewer large ones dropped; gamma 0 (a plain top-k).
    for density, gamma in ((0.9, 0.3), (0.5, 0.0)):
        p = {"weight": per(W3), "density": per([density] * 3), "gamma": per([gamma] * 3),
             "rescale": True, "normalize": True}
        out = run("breadcrumbs_ties", ts, p)
        case("breadcrumbs_ties", p, ts, out, "breadcrumbs_ties",
             {"weights": W3, "density": density, "gamma": gamma, "rescale": "l1",
              "normalize": True})
    # The DARE / DELLA presets at density 1 (no drop: deterministic): weights, normalize, lambda.
    for mk in ("dare_ties", "dare_linear", "della_linear"):
        for normalize in (False, True):
            p = {"weight": per(W3), "normalize": normalize, "lambda": 1.3}
            out = run(mk, ts, p)
            case(mk, p, ts, out, mk, {"weights": W3, "normalize": normalize, "lambda": 1.3})
    # task_arithmetic with weights and lambda.
    p = {"weight": per(W3), "lambda": 0.6}
    case("task_arithmetic", p, ts, run("task_arithmetic", ts, p), "task_arithmetic",
         {"weights": W3, "lambda": 0.6})

# Weights summing to 0 (the divisor guard) and a negative weight.
ts = tensors((5, 4), 2, 7)
for w in ([1.0, -1.0], [2.0, -0.5]):
    for mk in ("dare_linear", "dare_ties"):
        p = {"weight": per(w), "normalize": True}
        case(mk, p, ts, run(mk, ts, p), mk, {"weights": w, "normalize": True},
             "weights summing to 0 divide by 1 (mergekit's guard)")

# --- linear ---------------------------------------------------------------------------------------

for si, shape in enumerate(SHAPES):
    ts = tensors(shape, 3, 200 + si)[1:]
    for normalize in (True, False):
        p = {"weight": per([0.2, 0.5, 0.9], first=0), "normalize": normalize}
        group = TensorGroup.from_tensors(ts)
        out = registry.get("linear")([group], parameters=p)[0]
        case("linear", p, ts, out, "linear", {"weights": [0.2, 0.5, 0.9], "normalize": normalize})

# --- Methods of their own -------------------------------------------------------------------------

for si, shape in enumerate(SHAPES):
    seed = 300 + si
    ts2 = tensors(shape, 1, seed)
    for t in (0.1, 0.35, 1.0):
        p = {"t": t}
        case("nearswap", p, ts2, run("nearswap", ts2, p), "nearswap", {"t": t})
    ts3 = tensors(shape, 3, seed)
    # Some deltas below epsilon, so that RAM's unique / shared counts vary.
    for t in ts3[1:]:
        flat = t.view(-1)
        flat[::3] = ts3[0].view(-1)[::3]
    ts3[2].view(-1)[1::4] = ts3[0].view(-1)[1::4]
    for eps in (1e-5, 0.2):
        p = {"epsilon": eps}
        case("ram", p, ts3, run("ram", ts3, p), "ram", {"epsilon": eps})
        for r, alpha in ((0.1, 0.2), (0.5, 1.5)):
            p = {"epsilon": eps, "r": r, "alpha": alpha}
            case("ramplus_tl", p, ts3, run("ramplus_tl", ts3, p), "ramplus_tl",
                 {"epsilon": eps, "r": r, "alpha": alpha})
    ts3 = tensors(shape, 3, seed + 50)
    for k in (1.0, 0.5, 0.2):
        p = {"select_topk": k}
        case("sce", p, ts3, run("sce", ts3, p), "sce", {"select_topk": k})
    p = {"select_topk": 0.5, "int8_mask": True}
    case("sce", p, ts3, run("sce", ts3, p), "sce", {"select_topk": 0.5, "int8_mask": True})
    # multislerp: with and without a base.
    for normalize in (True, False):
        p = {"weight": per([0.3, 0.5, 0.4]), "normalize_weights": normalize}
        case("multislerp", p, ts3, run("multislerp", ts3, p), "multislerp",
             {"weights": [1.0, 0.3, 0.5, 0.4], "normalize_weights": normalize,
              "with_base": True}, "the base first; its weight is not used")
        q = {"weight": per([0.3, 0.5, 0.4], first=0), "normalize_weights": normalize}
        group = TensorGroup.from_tensors(ts3[1:])
        out = registry.get("multislerp")([group], parameters=q)[0]
        case("multislerp", q, ts3[1:], out, "multislerp",
             {"weights": [0.3, 0.5, 0.4], "normalize_weights": normalize}, "no base")
    # nuslerp: flattened, per row of the last dimension, per column (row_wise).
    for flatten, row_wise in ((True, False), (False, False), (False, True)):
        for w in ([1.0, 3.0], [2.0, 0.5]):
            p = {"weight": per(w), "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
            case("nuslerp", p, ts3[:3], run("nuslerp", ts3[:3], p), "nuslerp",
                 {"weights": [1.0] + w, "nuslerp_flatten": flatten,
                  "nuslerp_row_wise": row_wise}, "the base first; its weight is not used")
            q = {"weight": per(w, first=0), "nuslerp_flatten": flatten,
                 "nuslerp_row_wise": row_wise}
            group = TensorGroup.from_tensors(ts3[1:3])
            out = registry.get("nuslerp")([group], parameters=q)[0]
            case("nuslerp", q, ts3[1:3], out, "nuslerp",
                 {"weights": w, "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise},
                 "no base")
    # passthrough: the single input, scaled.
    one = ts3[1]
    for scale in (None, 0.5):
        q = {"scale": {0: scale}}
        group = TensorGroup.from_tensors([one])
        out = registry.get("passthrough")([group], parameters=q)[0]
        case("passthrough", {"scale": {0: scale}}, [one], out, "passthrough",
             {} if scale is None else {"scale": scale})
    # arcee_fusion (under a million elements: no random sample).
    case("arcee_fusion", {}, ts2, run("arcee_fusion", ts2, {}), "arcee_fusion", {})

# --- Random methods: statistics -------------------------------------------------------------------

RANDOM = []
torch.manual_seed(0)
rows, cols = 64, 1000
rng = np.random.default_rng(5)
base = torch.zeros(rows, cols, dtype=DT)
delta = torch.tensor(rng.normal(0.0, 1.0, size=(rows, cols)), dtype=DT)
model = base + delta
for mk, density, extra in (
    ("dare_linear", 0.3, {}),
    ("dare_linear", 0.7, {}),
    ("della_linear", 0.5, {"epsilon": 0.2}),
    ("della_linear", 0.3, {"epsilon": 0.1}),
):
    kept, factors = [], []
    fifths = np.zeros(5)
    draws = 8
    for _ in range(draws):
        p = {"weight": {1: 1.0}, "density": {1: density}, "rescale": False}
        p.update({k: {1: v} for k, v in extra.items()})
        out = run(mk, [base, model], p)
        mask = (out != 0).numpy()
        kept.append(mask.mean())
        # Kept fraction by magnitude-rank fifth within each row.
        ranks = np.argsort(np.argsort(np.abs(delta.numpy()), axis=1), axis=1)
        fifth = ranks * 5 // cols
        for f in range(5):
            fifths[f] += mask[fifth == f].mean() / draws
        p["rescale"] = True
        out = run(mk, [base, model], p)
        nz = out != 0
        factors.append(float((out[nz] / delta[nz]).mean()))
    RANDOM.append(
        {
            "mergekit": mk,
            "density": density,
            "params": extra,
            "shape": [rows, cols],
            "draws": draws,
            "kept_fraction": float(np.mean(kept)),
            "kept_by_rank_fifth": fifths.tolist(),
            "l1_factor": float(np.mean(factors)),
        }
    )

doc = {
    "mergekit_version": MERGEKIT_VERSION,
    "torch_version": torch.__version__,
    "cases": CASES,
    "random": RANDOM,
}
with open(OUT_PATH, "w") as f:
    json.dump(doc, f, indent=None, separators=(",", ":"))
    f.write("\n")
print(f"wrote {len(CASES)} cases, {len(RANDOM)} random statistics to {OUT_PATH}")
