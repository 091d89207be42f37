#!/usr/bin/env python3
"""Generate differential-test fixtures from the Python reference library sd-mecha.

This script is run OFFLINE by hand (it is not part of CI).  It needs a Python
environment with `torch` and `sd-mecha` installed, e.g.

    python3 -m venv /work/venv-mecha
    /work/venv-mecha/bin/pip install torch sd-mecha==1.1.8
    /work/venv-mecha/bin/python tools/sd_mecha_fixtures.py

It calls sd-mecha's merge-method python functions directly through
`<method>.__wrapped__(...)` on small in-memory float64 tensors, the same way
sd-mecha's own tests (tests/merge_methods/test_*.py) do, and writes the
results to crates/amalgam/tests/fixtures/sd_mecha.json.

Tensors are encoded as {"shape": [...], "values": <nested lists>} (row-major).
Every float is written with Python's shortest round-trip repr, so parsing it
back as f64 reproduces the exact float64 sd-mecha computed.
"""

import inspect
import json
import math
import os
import sys

import numpy as np
import torch

import sd_mecha
from sd_mecha.extensions.builtin.merge_methods import ties as sdm_ties

try:
    from importlib.metadata import version as _pkg_version
    SD_MECHA_VERSION = _pkg_version("sd-mecha")
except Exception:  # pragma: no cover
    SD_MECHA_VERSION = getattr(sd_mecha, "__version__", "unknown")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_PATH = os.path.join(REPO_ROOT, "crates", "amalgam", "tests", "fixtures", "sd_mecha.json")

DT = torch.float64

# sd-mecha 1.1.8 defaults (ties_sum_with_dropout / ties_sum_extended /
# geometric_median / model_stock signatures).
COS_EPS = 1e-6
EPS = 1e-6
MAXITER = 100
FTOL = 1e-20


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def enc(t):
    """Encode a tensor (or python scalar) as {"shape", "values"}."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t), dtype=DT)
    t = t.detach().to(DT).cpu()
    vals = t.tolist()
    _check_finite(vals)
    return {"shape": list(t.shape), "values": vals}


def _check_finite(v):
    if isinstance(v, list):
        for x in v:
            _check_finite(x)
    elif not math.isfinite(v):
        raise ValueError(f"non-finite value in fixture: {v}")


def tensor(values, shape):
    return torch.tensor(values, dtype=DT).reshape(shape)


def source_lines(fn, needles):
    """Quote the source lines of `fn` that contain any of `needles`."""
    src = inspect.getsource(fn).splitlines()
    return [line.rstrip() for line in src if any(n in line for n in needles)]


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------

A_VALS = [3, 4, 1, -2, 2, 1, -4, 3]
B_VALS = [-1, 3, 4, 2, 4, 2, -3, 1]
C_VALS = [-1, 2, 3, 4, 4, -3, 2, 1]
A = tensor(A_VALS, (2, 4))
B = tensor(B_VALS, (2, 4))
C = tensor(C_VALS, (2, 4))
ABC = [A, B, C]

RNG_SEED = 7
RNG_SCALE = 0.01
# numpy Generator API: np.random.default_rng(7).normal(0.0, 0.01, size=(4, 3, 5))
# Rounded to float32 values (kept as float64): sd-mecha rounds the top-k threshold to float32,
# which drops the threshold entry when the rounding goes up; f32-exact inputs avoid that quirk.
_rand = np.random.default_rng(RNG_SEED).normal(0.0, RNG_SCALE, size=(4, 3, 5)).astype(np.float32).astype(np.float64)
RAND4 = [torch.from_numpy(_rand[i].copy()) for i in range(4)]
RAND_GEN = (
    f"np.random.default_rng({RNG_SEED}).normal(0.0, {RNG_SCALE}, size=(4, 3, 5)) rounded to float32; "
    "tensor i = result[i] (the values are also stored in the inputs)"
)

INPUT_SETS = {
    "abc_2x4": ABC,
    "rand4_3x5_seed7": RAND4,
}


# --------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------

def n_average_cases():
    out = []
    for set_name, ins in INPUT_SETS.items():
        models = [{"x": t} for t in ins]
        res = sd_mecha.n_average.__wrapped__(*models, key="x")
        out.append({
            "name": f"n_average/{set_name}",
            "method": "n_average",
            "sd_mecha_call": "sd_mecha.n_average.__wrapped__(*[{'x': t} for t in inputs], key='x')",
            "params": {},
            "inputs": [enc(t) for t in ins],
            "expected": enc(res),
        })
    return out


def ties_cases():
    out = []
    for set_name, ins in INPUT_SETS.items():
        for apply_stock in (False, True):
            for k in (1.0, 0.5):
                for vote_sgn in (False, True):
                    for apply_median in (False, True):
                        params = {
                            "probability": 0.0,
                            "della_eps": 0.0,
                            "rescale": False,
                            "k": k,
                            "vote_sgn": vote_sgn,
                            "apply_stock": apply_stock,
                            "cos_eps": COS_EPS,
                            "apply_median": apply_median,
                            "eps": EPS,
                            "maxiter": MAXITER,
                            "ftol": FTOL,
                            "seed": 0,
                        }
                        res = sd_mecha.ties_sum_with_dropout.__wrapped__(*ins, **params)
                        # diagnostics (sd-mecha internals, same code path)
                        topk = [sdm_ties.filter_top_k(t, k) for t in ins]
                        filtered, counts = sdm_ties.ties_sum_deltas(*ins, k=k, vote_sgn=vote_sgn)
                        diag = {
                            "topk_kept_count_per_input": [int((t != 0).sum()) for t in topk],
                            # what the count would be if the kth-value threshold stayed float64
                            # (sd-mecha casts it to float32, see QUIRKS)
                            "topk_kept_count_if_f64_threshold": [
                                int((t.abs() >= t.abs().flatten().kthvalue(max(int((1 - k) * t.numel()), 1))[0]).sum())
                                for t in ins
                            ],
                            "param_counts": enc(counts),
                        }
                        if not apply_median and not apply_stock:
                            diag["model_stock_t"] = enc(sdm_ties.get_model_stock_t(filtered, cos_eps=COS_EPS))
                        name = (
                            f"ties_sum_with_dropout/{set_name}/k={k}/vote_sgn={vote_sgn}"
                            f"/apply_median={apply_median}/apply_stock={apply_stock}"
                        )
                        out.append({
                            "name": name,
                            "method": "ties_sum_with_dropout",
                            "sd_mecha_call": "sd_mecha.ties_sum_with_dropout.__wrapped__(*inputs, **params)",
                            "params": params,
                            "inputs": [enc(t) for t in ins],
                            "expected": enc(res),
                            "diagnostics": diag,
                        })
    return out


def ties_sum_plain_cases():
    out = []
    for set_name, ins in INPUT_SETS.items():
        for k in (1.0, 0.5):
            for vote_sgn in (False, True):
                params = {"k": k, "vote_sgn": vote_sgn}
                res = sd_mecha.ties_sum.__wrapped__(*ins, **params)
                out.append({
                    "name": f"ties_sum/{set_name}/k={k}/vote_sgn={vote_sgn}",
                    "method": "ties_sum",
                    "sd_mecha_call": "sd_mecha.ties_sum.__wrapped__(*inputs, **params)",
                    "params": params,
                    "inputs": [enc(t) for t in ins],
                    "expected": enc(res),
                })
    return out


def geometric_median_and_stock_cases():
    out = []
    for set_name, ins in INPUT_SETS.items():
        params = {"eps": EPS, "maxiter": MAXITER, "ftol": FTOL}
        res = sd_mecha.geometric_median.__wrapped__(*ins, **params)
        out.append({
            "name": f"geometric_median/{set_name}",
            "method": "geometric_median",
            "sd_mecha_call": "sd_mecha.geometric_median.__wrapped__(*inputs, **params)",
            "params": params,
            "inputs": [enc(t) for t in ins],
            "expected": enc(res),
        })
        params = {"cos_eps": COS_EPS}
        res = sd_mecha.model_stock.__wrapped__(*ins, **params)
        out.append({
            "name": f"model_stock/{set_name}",
            "method": "model_stock",
            "sd_mecha_call": "sd_mecha.model_stock.__wrapped__(*inputs, **params)",
            "params": params,
            "inputs": [enc(t) for t in ins],
            "expected": enc(res),
            "diagnostics": {"model_stock_t": enc(sdm_ties.get_model_stock_t(ins, cos_eps=COS_EPS))},
        })
    return out


DELLA_N = 100_000
DELLA_MULT = 7919
DELLA_OFFSET = 13
DELLA_SEEDS = list(range(20))
DELLA_P = 0.3
DELLA_DECILES = 10


def della_delta():
    """Magnitude rank r (0 = smallest) has value (r+1)*1e-4 with sign + for even r,
    - for odd r, stored at flat position (r*7919 + 13) % 100000."""
    r = np.arange(DELLA_N, dtype=np.int64)
    mags = (r + 1).astype(np.float64) * 1e-4
    signs = np.where(r % 2 == 0, 1.0, -1.0)
    pos = (r * DELLA_MULT + DELLA_OFFSET) % DELLA_N
    assert len(np.unique(pos)) == DELLA_N, "position map must be a permutation"
    vals = np.empty(DELLA_N, dtype=np.float64)
    vals[pos] = signs * mags
    assert len(np.unique(np.abs(vals))) == DELLA_N, "magnitudes must be distinct"
    return torch.from_numpy(vals), pos


def della_expected_decile_means(della_eps):
    n = DELLA_N
    ranks = np.arange(1, n + 1, dtype=np.float64)  # scipy rankdata 'ordinal' ranks 1..n
    p = np.clip(1.0 - DELLA_P + (ranks / n - (n + 1) / (n * 2)) * della_eps, 0.0, 1.0)
    per = n // DELLA_DECILES
    return [float(p[d * per:(d + 1) * per].mean()) for d in range(DELLA_DECILES)]


def della_case():
    delta, pos = della_delta()
    per = DELLA_N // DELLA_DECILES
    results = []
    apply_stock_false_error = None
    try:
        sd_mecha.ties_sum_with_dropout.__wrapped__(
            delta, probability=DELLA_P, della_eps=0.4, rescale=False, k=1.0, vote_sgn=True,
            apply_stock=False, apply_median=False, seed=0,
        )
    except Exception as e:  # sd-mecha 1.1.8: model-stock t of a single delta -> empty stack
        apply_stock_false_error = f"{type(e).__name__}: {e}"

    for della_eps in (0.4, -0.4):
        params = {
            "probability": DELLA_P,
            "della_eps": della_eps,
            "rescale": False,
            "k": 1.0,
            "vote_sgn": True,
            # apply_stock=False crashes for a single delta (see apply_stock_false_error);
            # apply_stock=True means t = 1.0, i.e. no model-stock scaling.
            "apply_stock": True,
            "cos_eps": COS_EPS,
            "apply_median": False,
            "eps": EPS,
            "maxiter": MAXITER,
            "ftol": FTOL,
        }
        kept_counts = []  # [seed][decile]
        for seed in DELLA_SEEDS:
            res = sd_mecha.ties_sum_with_dropout.__wrapped__(delta, seed=seed, **params)
            kept = (res != 0).numpy()
            # cross-check: same generator state -> same mask as the raw helper
            g = torch.Generator(delta.device)
            g.manual_seed(seed)
            mask = sdm_ties.find_della_dropout(delta, DELLA_P, della_eps, g).numpy() != 0
            assert (mask == kept).all(), "ties_sum_with_dropout mask != find_della_dropout mask"
            # unchanged where kept (rescale=False, k=1.0, single delta)
            assert torch.equal(res[torch.from_numpy(kept)], delta[torch.from_numpy(kept)])
            kept_by_rank = kept[pos]  # index r -> kept flag of magnitude rank r
            kept_counts.append([int(kept_by_rank[d * per:(d + 1) * per].sum()) for d in range(DELLA_DECILES)])
        kc = np.array(kept_counts, dtype=np.float64)
        results.append({
            "della_eps": della_eps,
            "params": params,
            "seeds": DELLA_SEEDS,
            "kept_count_per_seed_per_decile": kept_counts,
            "observed_keep_fraction_per_decile": [float(x) for x in (kc.mean(axis=0) / per)],
            "expected_keep_prob_mean_per_decile": della_expected_decile_means(della_eps),
            # binomial standard error of each observed fraction (seeds * decile size draws)
            "std_error_per_decile": [
                math.sqrt(p * (1 - p) / (len(DELLA_SEEDS) * per)) for p in della_expected_decile_means(della_eps)
            ],
            "overall_observed_keep_fraction": float(kc.sum() / (len(DELLA_SEEDS) * DELLA_N)),
        })

    return {
        "name": "della_keep_mask_stats",
        "method": "ties_sum_with_dropout (DELLA keep mask via find_della_dropout)",
        "sd_mecha_call": "sd_mecha.ties_sum_with_dropout.__wrapped__(delta, seed=seed, **params); kept := output != 0",
        "input": {
            "numel": DELLA_N,
            "shape": [DELLA_N],
            "generation": (
                "for magnitude rank r in 0..n (0 = smallest |delta|): value = (r+1)*1e-4 (float64), "
                "sign + if r even else -, stored at flat index (r*7919 + 13) % n"
            ),
            "rank_multiplier": DELLA_MULT,
            "rank_offset": DELLA_OFFSET,
            "magnitude_step": 1e-4,
        },
        "decile_definition": "decile d holds magnitude ranks r in [d*n/10, (d+1)*n/10), decile 0 = smallest |delta|",
        "kept_definition": "output element != 0",
        "keep_probability_formula": (
            "keep_p(rank) = clamp(1 - probability + (rank/n - (n+1)/(2n)) * della_eps, 0, 1), "
            "rank = scipy.stats.rankdata(|delta|, method='ordinal') in 1..n (1 = smallest |delta|); "
            "mask = torch.bernoulli(keep_p, generator) with generator.manual_seed(seed)"
        ),
        "keep_probability_code": source_lines(
            sdm_ties.find_della_dropout,
            ["rank_per_element", "ne =", "delta_i", "p_min", "bernoulli", "math.isclose"],
        ),
        "rescale_code": source_lines(
            sd_mecha.ties_sum_with_dropout.__wrapped__,
            ["rescalar", "return deltas"],
        ),
        "apply_stock_false_error": apply_stock_false_error,
        "results": results,
    }


QUIRKS = [
    "filter_top_k: kth = max(int((1-k)*numel), 1) (1-based, ascending |a|); the kth value is taken from "
    "a.abs().float() i.e. rounded to float32, then compared in float64: keep |a| >= f64(f32(kth)). "
    "So it keeps numel-kth+1 elements (plus ties) when f32 rounding goes down/exact, numel-kth when it "
    "rounds up (the threshold element itself is dropped). k=1.0 keeps everything.",
    "ties_sum_extended / ties_sum_with_dropout: `t = 1.0 if apply_stock else get_model_stock_t(...)` - "
    "apply_stock=False APPLIES the model-stock factor, apply_stock=True gives the plain TIES mean "
    "(the flag is inverted relative to its name). Ignored when apply_median=True.",
    "get_model_stock_t uses CosineSimilarity(dim=-1) between consecutive deltas (i, i+1), so t is "
    "per-row (last axis) for 2-D tensors, shape [rows, 1]; it raises on a single delta (empty stack).",
    "apply_median=True: geometric_median over the TIES-filtered deltas (zeros included), no division "
    "by param_counts; torch.dist is the Frobenius norm of the whole tensor.",
    "n_average accumulates with torch.lerp(res, x_i, 1/i), so results differ from sum/n in the last "
    "ulp (e.g. 8.3e-17 instead of 0).",
    "DELLA keep probability is centred on 1-probability (mean keep stays 1-p); rescale divides by the "
    "global (1-probability), not per-element keep_p. della_eps=0 skips the ranking entirely.",
    "seed=None or seed<0 leaves torch.Generator at its fixed default seed (deterministic, not random).",
]


def main():
    torch.set_default_dtype(DT)
    cases = []
    cases += n_average_cases()
    cases += ties_cases()
    cases += ties_sum_plain_cases()
    cases += geometric_median_and_stock_cases()

    doc = {
        "generated_by": "tools/sd_mecha_fixtures.py",
        "sd_mecha_version": SD_MECHA_VERSION,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
        "dtype": "float64",
        "tensor_encoding": "{shape: [int], values: nested lists, row-major}",
        "random_inputs": RAND_GEN,
        "sd_mecha_defaults": {"cos_eps": COS_EPS, "eps": EPS, "maxiter": MAXITER, "ftol": FTOL},
        "sd_mecha_code": {
            "filter_top_k": source_lines(sdm_ties.filter_top_k, ["k =", "kthvalue", "top_k_filter"]),
            "ties_sum_extended_stock": source_lines(
                sd_mecha.ties_sum_extended.__wrapped__, ["apply_stock else", "param_counts", "geometric_median"],
            ),
            "get_model_stock_t": source_lines(sdm_ties.get_model_stock_t, ["cos", "t ="]),
        },
        "quirks": QUIRKS,
        "cases": cases,
        "della": della_case(),
    }
    os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
    with open(OUT_PATH, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
    print(f"wrote {OUT_PATH} ({os.path.getsize(OUT_PATH)} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
