#!/usr/bin/env python3
"""Generate differential-test fixtures for supermerger's merge modes and calculation modes.

supermerger (hako-mikan/sd-webui-supermerger) is an A1111 extension, not a package: it cannot be
imported outside the web UI. This script is a REIMPLEMENTATION FROM ITS PUBLISHED CODE, commit
0b1c4915a6ede98ce3528b4f097361842a641d1d ("for Forge Neo"), file scripts/mergers/mergers.py:
each function below transcribes the lines of `smerge` (the "normal" branch for the modes
Weight sum / Add difference / Triple sum / sum Twice, with its default `uselerp`) or the helper
of one calculation mode (`precosine` + `cosine`, `traindiff`, the smoothAdd branch and
`multithread_smoothadd`, `extract_super`, `tensormerge`, the "self" and "plus random" branches),
with the same torch calls (`torch.lerp`, `cosine_similarity`, `nn.functional.normalize`,
`scipy.ndimage.median_filter`/`gaussian_filter`), on float64 tensors. Where supermerger rounds to
float32 on the way (smoothAdd filters `.to(torch.float32)`; add-difference's stage 0 computes
B - C in float32), this script stays in float64: the fixtures pin the formula, not supermerger's
float32 rounding (amalgam computes in the compute type).

Run OFFLINE by hand (not part of CI):

    /work/venv-mecha/bin/python tools/supermerger_fixtures.py

It writes crates/amalgam/tests/fixtures/supermerger_modes.json. Each case names the mode as
supermerger's UI does ("method": the alias a user types), its parameters (alpha, beta, gamma as
supermerger's base_alpha, base_beta and option(gamma)), the key name where the mode depends on it,
the input tensors (model A, B, C in order) and the output. The cosine modes need the whole model
(the min and max of every key's similarities): their cases are models of several keys.

Tensors are {"shape": [...], "values": <flat list, row-major>}; floats are written with Python's
shortest round-trip repr, so they parse back as the exact float64 computed here.
"""

import json
import os

import numpy as np
import scipy.ndimage
import torch

from fixture_common import enc
import torch.nn as nn
from torch import lerp
from torch.nn.functional import cosine_similarity

SUPERMERGER_COMMIT = "0b1c4915a6ede98ce3528b4f097361842a641d1d"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_PATH = os.path.join(REPO_ROOT, "crates", "amalgam", "tests", "fixtures", "supermerger_modes.json")
DT = torch.float64
SHAPES = [(4, 6), (5,), (3, 2, 2, 2)]
SELFKEYS = ["to_out", "proj_out", "norm"]
KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


def inputs(shape, seed):
    """Models A, B, C with edge cases at fixed flat positions."""
    n = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    a, b, c = (np.round(rng.normal(0.0, 1.0, size=n), 3) for _ in range(3))
    a[0] = 0.0                  # a zero
    b[1] = c[1]                 # B equals C: no difference to add
    a[2] = b[2] = c[2] = 0.5    # all equal: trainDifference's 0/0
    if n > 3:
        b[3] = -a[3]            # opposite
    if n > 4:
        a[4] = b[4]             # A equals B
    return [torch.tensor(x, dtype=DT).reshape(shape) for x in (a, b, c)]


# ---- mergers.py, smerge, calcmode "normal" (uselerp = True, the default) -------------------

def weight_sum(a, b, alpha):
    if alpha == 1:
        return b.clone()
    if alpha != 0:
        return torch.lerp(a, b, alpha)
    return a.clone()


def add_difference(a, b, c, alpha):
    d = b - c  # stage 0: theta_1 = B - C
    return torch.lerp(a, a + alpha * d, 1.0)


def triple_sum(a, b, c, alpha, beta):
    if alpha + beta != 0:
        return lerp(a, lerp(b, c, beta / (alpha + beta)), alpha + beta)
    return (1 - alpha - beta) * a + alpha * b + beta * c


def sum_twice(a, b, c, alpha, beta):
    return torch.lerp(torch.lerp(a, b, alpha), c, beta)


# ---- traindiff ------------------------------------------------------------------------------

def train_difference(a, b, c, alpha):
    if torch.allclose(b, c, rtol=0, atol=0):
        return a.clone()
    diff_AB = b - c
    distance_A0 = torch.abs(b - c)
    distance_A1 = torch.abs(b - a)
    sum_distances = distance_A0 + distance_A1
    scale = torch.where(sum_distances != 0, distance_A1 / sum_distances, torch.tensor(0., dtype=DT))
    sign_scale = torch.sign(b - c)
    scale = sign_scale * torch.abs(scale)
    new_diff = scale * torch.abs(diff_AB)
    return a + (new_diff * (alpha * 1.8))


# ---- smoothAdd (and smoothAdd MT, the same per key on threads) ------------------------------

def smooth_add(a, b, c, alpha):
    d = (b - c).numpy()  # stage 0; supermerger then filters it as float32
    filtered = scipy.ndimage.median_filter(d, size=3)
    filtered = scipy.ndimage.gaussian_filter(filtered, sigma=1)
    return a + alpha * torch.tensor(filtered, dtype=DT)


# ---- extract_super (base = A, a = B, b = C, gamma = opt_value) --------------------------------

def extract_super(base, a, b, alpha, beta, gamma):
    assert 0 <= alpha <= 1 and 0 <= beta <= 1 and 0 <= gamma
    a = a - base
    b = b - base
    c = cosine_similarity(a, b, -1).clamp(-1, 1).unsqueeze(-1)
    d = ((c + 1) / 2) ** gamma
    return base + lerp(a, b, alpha) * lerp(d, 1 - d, beta)


# ---- tensormerge ("tensor": mode True; "tensor2": mode False) --------------------------------

def tensormerge(mode, a, b, current_alpha, current_beta):
    theta_0 = {"k": a.clone()}
    theta_1 = {"k": b.clone()}
    key = "k"
    dim = theta_0[key].dim()
    if dim == 0:
        return theta_0[key]
    if mode:
        if current_alpha + current_beta <= 1:
            talphas = int(theta_0[key].shape[0] * (current_beta))
            talphae = int(theta_0[key].shape[0] * (current_alpha + current_beta))
            if dim in (1, 2, 3, 4):
                theta_0[key][talphas:talphae] = theta_1[key][talphas:talphae].clone()
        else:
            talphas = int(theta_0[key].shape[0] * (current_alpha + current_beta - 1))
            talphae = int(theta_0[key].shape[0] * (current_beta))
            theta_t = theta_1[key].clone()
            if dim in (1, 2, 3, 4):
                theta_t[talphas:talphae] = theta_0[key][talphas:talphae].clone()
            theta_0[key] = theta_t
    else:
        if current_alpha + current_beta <= 1:
            talphas = int(theta_0[key].shape[0] * (current_beta))
            talphae = int(theta_0[key].shape[0] * (current_alpha + current_beta))
            if dim > 1:
                if theta_0[key].shape[1] > 100:
                    talphas = int(theta_0[key].shape[1] * (current_beta))
                    talphae = int(theta_0[key].shape[1] * (current_alpha + current_beta))
            if dim == 1:
                theta_0[key][talphas:talphae] = theta_1[key][talphas:talphae].clone()
            elif dim in (2, 3, 4):
                theta_0[key][:, talphas:talphae] = theta_1[key][:, talphas:talphae].clone()
        else:
            talphas = int(theta_0[key].shape[0] * (current_alpha + current_beta - 1))
            talphae = int(theta_0[key].shape[0] * (current_beta))
            theta_t = theta_1[key].clone()
            if dim > 1:
                if theta_0[key].shape[1] > 100:
                    talphas = int(theta_0[key].shape[1] * (current_alpha + current_beta - 1))
                    talphae = int(theta_0[key].shape[1] * (current_beta))
            if dim == 1:
                theta_t[talphas:talphae] = theta_0[key][talphas:talphae].clone()
            elif dim in (2, 3, 4):
                theta_t[:, talphas:talphae] = theta_0[key][:, talphas:talphae].clone()
            theta_0[key] = theta_t
    return theta_0[key]


# ---- "self" ---------------------------------------------------------------------------------

def self_mode(key, a, alpha):
    if any(selfkey in key for selfkey in SELFKEYS):
        return a.clone()
    if alpha == 0:
        return a.clone()
    return a.clone() * alpha


# ---- precosine + cosine (cosineA: calcmode "A" in it; cosineB otherwise) -----------------------

def precosine(is_a, theta_0, theta_1):
    sim = torch.nn.CosineSimilarity(dim=0)
    sims = np.array([], dtype=np.float64)
    for key in theta_0.keys():
        if "first_stage_model" in key:
            continue
        if "model" in key and key in theta_1:
            if is_a:
                theta_0_norm = nn.functional.normalize(theta_0[key], p=2, dim=0)
                theta_1_norm = nn.functional.normalize(theta_1[key], p=2, dim=0)
                simab = sim(theta_0_norm, theta_1_norm)
                sims = np.append(sims, simab.cpu().numpy())
            else:
                simab = sim(theta_0[key], theta_1[key])
                dot_product = torch.dot(theta_0[key].view(-1), theta_1[key].view(-1))
                magnitude_similarity = dot_product / (torch.norm(theta_0[key]) * torch.norm(theta_1[key]))
                combined_similarity = (simab + magnitude_similarity) / 2.0
                sims = np.append(sims, combined_similarity.cpu().numpy())
    sims = sims[~np.isnan(sims)]
    sims = np.delete(sims, np.where(sims < np.percentile(sims, 1, method='midpoint')))
    sims = np.delete(sims, np.where(sims > np.percentile(sims, 99, method='midpoint')))
    return sim, sims


def cosine(is_a, key, sim, sims, current_alpha, theta_0, theta_1):
    if "first_stage_model" in key:  # smerge's `continue`
        return
    if "model" in key and key in theta_0:
        if is_a:
            theta_0_norm = nn.functional.normalize(theta_0[key], p=2, dim=0)
            theta_1_norm = nn.functional.normalize(theta_1[key], p=2, dim=0)
            simab = sim(theta_0_norm, theta_1_norm)
            dot_product = torch.dot(theta_0_norm.view(-1), theta_1_norm.view(-1))
            magnitude_similarity = dot_product / (torch.norm(theta_0_norm) * torch.norm(theta_1_norm))
            combined_similarity = (simab + magnitude_similarity) / 2.0
            k = (combined_similarity - sims.min()) / (sims.max() - sims.min())
            k = k - abs(current_alpha)
        else:
            simab = sim(theta_0[key], theta_1[key])
            dot_product = torch.dot(theta_0[key].view(-1), theta_1[key].view(-1))
            magnitude_similarity = dot_product / (torch.norm(theta_0[key]) * torch.norm(theta_1[key]))
            combined_similarity = (simab + magnitude_similarity) / 2.0
            k = (combined_similarity - sims.min()) / (sims.max() - sims.min())
            k = k - current_alpha
        k = k.clip(min=0, max=1.0)
        theta_0[key] = lerp(theta_1[key], theta_0[key], k)


def cosine_model(is_a, model_a, model_b, alpha):
    theta_0 = {k: v.clone() for k, v in model_a.items()}
    theta_1 = {k: v.clone() for k, v in model_b.items()}
    sim, sims = precosine(is_a, theta_0, theta_1)
    for key in list(theta_0.keys()):
        cosine(is_a, key, sim, sims, alpha, theta_0, theta_1)
    return theta_0, float(sims.min()), float(sims.max())


def cosine_models(seed):
    """Two models of several keys, B near A (cosines near 1 with a spread), and a VAE key."""
    rng = np.random.default_rng(seed)
    shapes = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (4, 6),
        "model.diffusion_model.input_blocks.1.1.norm.bias": (5,),
        "model.diffusion_model.middle_block.0.in_layers.2.weight": (3, 2, 2, 2),
        "model.diffusion_model.out.2.weight": (6, 5),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (7,),
        "first_stage_model.decoder.conv_in.weight": (2, 3),
    }
    ma, mb = {}, {}
    for i, (k, shape) in enumerate(shapes.items()):
        n = int(np.prod(shape))
        a = np.round(rng.normal(0.0, 1.0, size=n), 3)
        noise = (0.15 + 0.25 * i) * rng.normal(0.0, 1.0, size=n)
        b = np.round(a + noise, 3)
        ma[k] = torch.tensor(a, dtype=DT).reshape(shape)
        mb[k] = torch.tensor(b, dtype=DT).reshape(shape)
    return ma, mb


def main():
    cases = []

    def case(method, ins, params, out, call, key=KEY):
        cases.append({
            "method": method,
            "key": key,
            "inputs": [enc(t) for t in ins],
            "params": params,
            "output": enc(out),
            "supermerger": call,
        })

    for si, shape in enumerate(SHAPES):
        a, b, c = inputs(shape, 300 + si)
        for al in (0.3, 1.0):
            case("Weight sum", [a, b], {"alpha": al}, weight_sum(a, b, al),
                 "mode Weight sum, calcmode normal")
        for al in (0.7, -0.4):
            case("Add difference", [a, b, c], {"alpha": al}, add_difference(a, b, c, al),
                 "mode Add difference, calcmode normal")
        for al, be in ((0.3, 0.25), (0.6, 0.7), (0.0, 0.0), (0.4, -0.4)):
            case("Triple sum", [a, b, c], {"alpha": al, "beta": be}, triple_sum(a, b, c, al, be),
                 "mode Triple sum, calcmode normal")
            case("sum Twice", [a, b, c], {"alpha": al, "beta": be}, sum_twice(a, b, c, al, be),
                 "mode sum Twice, calcmode normal")
        for al in (0.5, 1.0):
            case("trainDifference", [a, b, c], {"alpha": al}, train_difference(a, b, c, al),
                 "mode Add difference, calcmode trainDifference (traindiff)")
        for al in (0.5, 1.0):
            case("smoothAdd", [a, b, c], {"alpha": al}, smooth_add(a, b, c, al),
                 "mode Add difference, calcmode smoothAdd")
        case("smoothAdd MT", [a, b, c], {"alpha": 0.8}, smooth_add(a, b, c, 0.8),
             "mode Add difference, calcmode smoothAdd MT (multithread_smoothadd)")
        for al, be, ga in ((0.0, 0.0, 0.3), (0.3, 1.0, 1.0), (1.0, 0.5, 10.0), (0.6, 0.2, 0.1)):
            case("extract", [a, b, c], {"alpha": al, "beta": be, "gamma": ga},
                 extract_super(a, b, c, al, be, ga),
                 "mode Add difference, calcmode extract (extract_super(A, B, C, alpha, beta, opt_value))")
        for al, be in ((0.5, 0.25), (0.3, 0.0), (0.8, 0.6), (1.0, 0.0), (0.25, 0.5)):
            case("tensor", [a, b], {"alpha": al, "beta": be}, tensormerge(True, a, b, al, be),
                 "mode Weight sum, calcmode tensor (tensormerge)")
            case("tensor2", [a, b], {"alpha": al, "beta": be}, tensormerge(False, a, b, al, be),
                 "mode Weight sum, calcmode tensor2 (tensormerge)")
        for al in (0.9, 0.0):
            case("self", [a], {"alpha": al}, self_mode(KEY, a, al), "calcmode self")
        pk = "model.diffusion_model.input_blocks.1.1.proj_out.weight"
        case("self", [a], {"alpha": 0.9}, self_mode(pk, a, 0.9), "calcmode self", key=pk)

    # tensor2 with more than 100 columns: slices of dim 1 by its own length.
    for shape in ((3, 101), (2, 103, 2)):
        a, b, _ = inputs(shape, 400 + len(shape))
        for al, be in ((0.5, 0.25), (0.8, 0.6)):
            case("tensor2", [a, b], {"alpha": al, "beta": be}, tensormerge(False, a, b, al, be),
                 "mode Weight sum, calcmode tensor2 (tensormerge)")
            case("tensor", [a, b], {"alpha": al, "beta": be}, tensormerge(True, a, b, al, be),
                 "mode Weight sum, calcmode tensor (tensormerge)")
    # smoothAdd over a longer axis than the Gaussian's radius (4) and a 2-D one wider than it.
    for shape in ((11,), (6, 9)):
        a, b, c = inputs(shape, 500 + len(shape))
        case("smoothAdd", [a, b, c], {"alpha": 0.5}, smooth_add(a, b, c, 0.5),
             "mode Add difference, calcmode smoothAdd")

    models = []
    ma, mb = cosine_models(600)
    for mode in ("cosineA", "cosineB"):
        for al in (0.0, 0.3, -0.2):
            out, lo, hi = cosine_model(mode == "cosineA", ma, mb, al)
            models.append({
                "method": mode,
                "params": {"alpha": al},
                "sim_min": lo,
                "sim_max": hi,
                "keys": [
                    {"key": k, "inputs": [enc(ma[k]), enc(mb[k])], "output": enc(out[k])}
                    for k in ma
                ],
                "supermerger": f"mode Weight sum, calcmode {mode} (precosine + cosine)",
            })

    doc = {
        "supermerger_commit": SUPERMERGER_COMMIT,
        "torch_version": torch.__version__,
        "scipy_version": scipy.__version__,
        "generator": "tools/supermerger_fixtures.py",
        "cases": cases,
        "models": models,
    }
    with open(OUT_PATH, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"{len(cases)} cases, {len(models)} models -> {OUT_PATH} ({os.path.getsize(OUT_PATH)} bytes)")


if __name__ == "__main__":
    main()
