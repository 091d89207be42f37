#!/usr/bin/env python3
"""Cross-check amalgam's KnOTS fixtures against the official KnOTS code (gstoica27/KnOTS).

Usage (offline, by hand; not part of CI):

    # 1. an extracted checkout of the official code (any clone works too):
    #      git clone https://github.com/gstoica27/KnOTS /tmp/knots_official
    #    or, from a bare mirror:
    #      mkdir -p /tmp/knots_official
    #      git -C <bare KnOTS git dir> archive HEAD | tar -x -C /tmp/knots_official
    # 2. a Python with numpy + torch (the venv of tools/svd_fixtures.py):
    /work/venv-mecha/bin/python tools/knots_official.py [--official /tmp/knots_official]
        [--fixture crates/amalgam/tests/fixtures/svd.json] [--input-dtype float64|float32]

What it does
------------
For every "knots" case of svd.json (written by tools/svd_fixtures.py, inputs stored in full)
it rebuilds the dense updates dW_t = up_t @ down_t * alpha_t / rank_t and feeds them to the
official merge path, imported unmodified from the checkout (only its unused heavy imports -
clip, transformers, peft, sklearn - are stubbed):

    task_merger.SVDMerger.transform  (directions_to_matrices, apply_svd)
    task_merger.SVDMerger.merge      (apply_dare, masking_ops.ties_masking, masking_ops.masked_merge,
                                      reconstruct_merged_sd, matrix_to_state_dict, add_task_parameters)

with the configuration of configs/vitB_r16_knots_ties.py (representation 'svd-vector',
merge_method 'ties', sign_resolve_mode 'sum_of_values', merging_type 'mean',
concat_across_output True, topK = 100*k, scaling_coeffs = lambda) and prints, per case, the
max abs / max relative (to max|expected|) difference of the official merged dW against the
fixture's expected dW (= what the Rust tests check crates/amalgam/src/lora/knots.rs against).

The official code has no notion of a LoRA lacking a module: every task must have every key
(otherwise its concatenation/split misaligns).  A missing module is therefore fed as a zero
update.  amalgam (and the fixture) also puts zeros into that module's SVD, but leaves the
absent LoRA's R_t out of its task vector, so the top-k threshold (k = int(d*K) of a longer d
in the official code) can differ.  For such cases the script also compares the official
result with tools/svd_fixtures.knots_ref run on the zero-padded LoRAs (needs sd-mecha
importable; skipped otherwise), which isolates that difference.

KnOTS-DARE-TIES (topK 100, DARE p = 0.1, seed 421, lambda = 0.7: configs/vitB_r16_knots_dare_ties.py)
is also run through the official code for every case and compared with a small numpy
re-implementation of amalgam's semantics (spec section 14) fed with the SAME Bernoulli masks
(replayed from torch's RNG in the official order).  amalgam's own DARE masks come from a
different counter-based generator, so amalgam's DARE output is not comparable element-wise.

The official code is only imported at run time; nothing of it is copied here.
"""

import argparse
import json
import os
import sys
import types

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO_ROOT, "crates", "amalgam", "tests", "fixtures", "svd.json")


# ---------------------------------------------------------------- official code import

def import_official(path):
    """Imports task_merger (and through it utils, masking_ops) from a checkout, with the
    heavy third-party imports of utils.py that the merge path never uses stubbed."""
    class _Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    for name in ["clip", "sklearn", "sklearn.model_selection", "transformers", "peft"]:
        try:
            __import__(name)
        except Exception:
            sys.modules[name] = _Stub(name)
    sys.path.insert(0, os.path.abspath(path))
    import pdb  # the official code drops into pdb on errors; fail loudly instead

    def _no_pdb(*a, **k):
        raise RuntimeError("official code hit pdb.set_trace() (an exception inside it)")

    pdb.set_trace = _no_pdb
    import task_merger
    import masking_ops
    return task_merger, masking_ops


# ---------------------------------------------------------------- fixture decoding

def dec(t):
    return np.array(t["values"], dtype=np.float64).reshape(t["shape"])


def load_cases(path):
    with open(path) as f:
        doc = json.load(f)
    out = []
    for c in doc["cases"]:
        if c["method"] != "knots":
            continue
        loras = [{m: (dec(v["up"]), dec(v["down"]), float(v["alpha"])) for m, v in l.items()}
                 for l in c["inputs"]["loras"]]
        out.append((c["name"], c["params"], loras, {m: dec(x) for m, x in c["expected"].items()}))
    return out


def dense_updates(loras):
    """Per LoRA {module: dW} over the union of modules; a missing module is a zero update."""
    names = sorted({m for l in loras for m in l})
    shapes = {}
    for l in loras:
        for m, (up, down, _) in l.items():
            shapes[m] = (up.shape[0], down.shape[1])
    dws = []
    for l in loras:
        d = {}
        for m in names:
            if m in l:
                up, down, alpha = l[m]
                d[m] = up @ down * (alpha / down.shape[0])
            else:
                d[m] = np.zeros(shapes[m])
        dws.append(d)
    return names, dws


# ---------------------------------------------------------------- running the official merge

class _FT:
    """Stands for a (PEFT) fine-tuned model as seen through LoRAHandler.get_ft_parameters():
    {'<layer>.weight': B @ A} (sorted)."""

    def __init__(self, params):
        self.params = params

    def get_ft_parameters(self):
        return dict(sorted(self.params.items()))


class _Pretrained(torch.nn.Module):
    """The base model: its state dict holds the (zero) weights dW is added to; its LoRA is the
    untrained one (B = 0, as the fresh PEFT model of utils.prepare_hf_clip), so its
    get_ft_parameters() is zeros and the official task directions are the fine-tuned B @ A."""

    def __init__(self, shapes):
        super().__init__()
        self.sd = {k: torch.zeros(s, dtype=torch.float32) for k, s in shapes.items()}

    def state_dict(self, *a, **k):
        return self.sd

    def get_ft_parameters(self):
        return {k: v.clone() for k, v in sorted(self.sd.items())}


def official_merge(task_merger, names, dws, k, lam, dare_p=0.0, dare_seed=421, dtype=torch.float64):
    for m in names:
        # get_layer_names / directions_to_matrices turn any layer whose name contains 'norm' or
        # 'ln' into a diagonal: keep such names out of this check.
        assert "norm" not in m and "ln" not in m and "_weight" not in m, m
    keys = {m: m + ".weight" for m in names}
    fts = [_FT({keys[m]: torch.tensor(d[m], dtype=dtype) for m in names}) for d in dws]
    base = _Pretrained({keys[m]: dws[0][m].shape for m in names})
    cfg = {
        "representation": "svd-vector",
        "sign_resolve_mode": "sum_of_values",
        "scaling_coeffs": lam,
        "topK": int(round(k * 100)),
        "merge_method": "ties",
        "merging_type": "mean",
        "concat_across_output": True,
        "dare": dare_p > 0,
        "dare_pruning_coeffs": dare_p,
        "dare_seed": dare_seed,
    }
    merger = task_merger.SVDMerger(fts, base, param_handler=lambda x: x, device="cpu", merge_config=cfg)
    merger.transform(cfg)
    merger.set_scaling_coeffs(cfg["scaling_coeffs"])  # as eval_scripts/8vision_joint.py
    model = merger.merge(cfg)
    sd = model.state_dict()
    return {m: sd[keys[m]].double().numpy() for m in names}


# ---------------------------------------------------------------- amalgam semantics (for DARE)

def replay_dare_masks(ranks_cols, n, p, seed):
    """The official DARE masks (TaskMerger.apply_dare/randbin): torch.manual_seed(seed), then per
    task, per module in sorted order, randint(2, (r, I)).bernoulli(1 - p)."""
    torch.manual_seed(seed)
    masks = []
    for _ in range(n):
        masks.append({m: torch.randint(2, size=rc, dtype=torch.float32).bernoulli(1 - p).numpy()
                      for m, rc in sorted(ranks_cols.items())})
    return masks


def amalgam_semantics(loras, k, lam, p=0.0, seed=421):
    """knots.rs's merge in numpy float64 (zero-filled SVD, absent LoRAs left out of the task
    vectors, global top-k per LoRA, mass election with a zero sum taking the sign of the elected
    signs' sum (>= 0 -> +), disjoint mean, times lambda), DARE masks replayed from the
    official RNG."""
    names, dws = dense_updates(loras)
    n = len(loras)
    U, R = {}, {}
    for m in names:
        mat = np.concatenate([d[m] for d in dws], axis=1)
        u, s, vh = np.linalg.svd(mat, full_matrices=False)
        r = int(np.sum(s > 1e-5))
        c = dws[0][m].shape[1]
        U[m] = u[:, :r]
        R[m] = [(s[:r, None] * vh[:r, t * c:(t + 1) * c]).astype(np.float32).astype(np.float64)
                for t in range(n)]
    if p > 0:
        masks = replay_dare_masks({m: R[m][0].shape for m in names}, n, p, seed)
        for m in names:
            for t in range(n):
                R[m][t] = R[m][t] * masks[t][m] / (1 - p)
    present = [[m in l for m in names] for l in loras]
    thr = []
    for t in range(n):
        v = np.abs(np.concatenate([R[m][t].ravel() for i, m in enumerate(names) if present[t][i]]))
        if k >= 1:
            thr.append(0.0)
        else:
            d = v.size
            thr.append(np.partition(v, max(d - int(d * k), 1) - 1)[max(d - int(d * k), 1) - 1])
    kept = {m: np.stack([np.where(np.abs(R[m][t]) >= thr[t], R[m][t], 0) if present[t][i]
                         else np.zeros_like(R[m][t]) for t in range(n)])
            for i, m in enumerate(names)}
    sign = {m: np.sign(kept[m].sum(0)) for m in names}
    majority = 1.0 if sum(sign[m].sum() for m in names) >= 0 else -1.0
    out = {}
    for m in names:
        g = np.where(sign[m] == 0, majority, sign[m])
        sel = ((g > 0) & (kept[m] > 0)) | ((g < 0) & (kept[m] < 0))
        merged = (kept[m] * sel).sum(0) / np.maximum(sel.sum(0), 1)
        out[m] = U[m] @ (lam * merged)
    return out


# ---------------------------------------------------------------- comparison

def diff(a, b):
    """(max abs diff, max abs diff / max |b|) over all modules."""
    mx = max(float(np.abs(a[m] - b[m]).max()) for m in b)
    scale = max(float(np.abs(b[m]).max()) for m in b)
    return mx, mx / max(scale, 1e-300)


def try_knots_ref():
    try:
        sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
        import svd_fixtures
        return svd_fixtures.knots_ref
    except Exception as e:  # sd-mecha missing, etc.
        print(f"(tools/svd_fixtures.py not importable: {e}; zero-padded check skipped)")
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", default="/tmp/knots_official", help="extracted gstoica27/KnOTS checkout")
    ap.add_argument("--fixture", default=FIXTURE)
    ap.add_argument("--input-dtype", default="float64", choices=["float64", "float32"],
                    help="dtype of the dense updates handed to the official code (it takes the SVD in "
                         "float64 and casts U, s, V to float32 after it either way)")
    ap.add_argument("--tol", type=float, default=1e-5, help="relative tolerance for PASS")
    args = ap.parse_args()
    dtype = getattr(torch, args.input_dtype)
    task_merger, _ = import_official(args.official)
    knots_ref = try_knots_ref()

    import contextlib
    import io

    def quiet(f, *a, **k):  # the official code prints progress
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return f(*a, **k)

    ok = True
    print(f"{'case':<34} {'comparison':<44} {'max abs':>10} {'max rel':>10}")
    for name, params, loras, expected in load_cases(args.fixture):
        k, lam = params["k"], params["lambda"]
        names, dws = dense_updates(loras)
        missing = any(m not in l for l in loras for m in names)
        off = quiet(official_merge, task_merger, names, dws, k, lam, dtype=dtype)
        a, r = diff(off, expected)
        verdict = "PASS" if r <= args.tol else ("differs (missing module)" if missing else "FAIL")
        ok &= r <= args.tol or missing
        print(f"{name:<34} {'official TIES vs fixture':<44} {a:10.3e} {r:10.3e}  {verdict}")
        if missing and knots_ref is not None:
            padded = []
            for l in loras:
                p = dict(l)
                for m in names:
                    if m not in p:
                        up, down, alpha = next(x[m] for x in loras if m in x)
                        p[m] = (np.zeros_like(up), np.zeros_like(down), alpha)
                padded.append(p)
            ref = quiet(knots_ref, padded, k, lam)
            a, r = diff(off, ref)
            ok &= r <= args.tol
            print(f"{'':<34} {'official TIES vs knots_ref(zero-padded)':<44} {a:10.3e} {r:10.3e}  "
                  f"{'PASS' if r <= args.tol else 'FAIL'}")
        # self-check of the numpy re-implementation against the fixture
        a, r = diff(amalgam_semantics(loras, k, lam), expected)
        ok &= r <= 1e-6
        print(f"{'':<34} {'amalgam_semantics TIES vs fixture':<44} {a:10.3e} {r:10.3e}  "
              f"{'PASS' if r <= 1e-6 else 'FAIL'}")
        # KnOTS-DARE-TIES, paper defaults, the official masks replayed
        off = quiet(official_merge, task_merger, names, dws, 1.0, 0.7, dare_p=0.1, dare_seed=421, dtype=dtype)
        ours = quiet(amalgam_semantics, loras, 1.0, 0.7, p=0.1, seed=421)
        a, r = diff(off, ours)
        ok &= r <= args.tol
        print(f"{'':<34} {'official DARE-TIES vs amalgam_semantics':<44} {a:10.3e} {r:10.3e}  "
              f"{'PASS' if r <= args.tol else 'FAIL'}")
    print("overall:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
