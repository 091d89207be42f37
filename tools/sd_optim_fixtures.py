"""Fixtures for sd-optim's methods (amalgam's tests/sd_optim_methods.rs): `multi_domain_alignment`
and `ties_sum_extended`.

sd-optim is not packaged, so this is a reimplementation, in torch, of the published code at
Enferlain/sd-optim `ba47e65` (sd_interim_bayesian_merger/merge_methods.py:
multi_domain_alignment, handle_attention_projection, frequency_selective_alignment,
calculate_phase_coherence, adjust_frequency_components, calculate_spectral_centroid,
calculate_dissimilarity, gaussian_blur), step by step as it runs, with one change: the FFTs run in
float64 where the code casts to float32, so that the comparison can be tight. The shipped
behaviour of the dead branches is kept: the cross-attention importance is 1 (its guard tests
`min((-1, cols)) > 1`) and the blur runs along a singleton axis.

`ties_sum_extended` is reimplemented from the code at `0bbd82a` (streaming_ties_sum_extended,
_process_model_chunk, _compute_final_results, _compute_geometric_median_chunked, filter_top_k;
`apply_stock`'s factor from `_compute_model_stock_chunked_v2` at `8c43aef`, since 0bbd82a's takes
`torch.mean` of a bool tensor, which torch refuses),
as it runs: its geometric median stops at its first convergence test (it compares with an
infinite best objective) and returns its starting point, the mean over all models; signs of
|x| <= 1e-7 count as 0.

Run: /work/venv-mecha/bin/python tools/sd_optim_fixtures.py
Writes crates/amalgam/tests/fixtures/sd_optim_methods.json.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

EPS = 1e-10


def centroid(x):
    n = x.shape[0]
    mags = torch.abs(x)
    freqs = torch.arange(n, dtype=torch.float64) / n
    return ((freqs * mags).sum() / (mags.sum() + EPS)).item()


def coherence(fa, fb, fc):
    pa, pb, pc = torch.angle(fa), torch.angle(fb), torch.angle(fc)
    wrap = lambda d: torch.abs(torch.angle(torch.exp(1j * d)))
    return (torch.mean(torch.cos(wrap(pa - pb)) + torch.cos(wrap(pa - pc)) + torch.cos(wrap(pb - pc))) / 3).item()


def frequency_aligned(a, b, c, margin_factor):
    af, bf, cf = a.reshape(-1), b.reshape(-1), c.reshape(-1)
    fa, fb, fc = torch.fft.rfft(af), torch.fft.rfft(bf), torch.fft.rfft(cf)
    size = fa.shape[0]
    ka, kb, kc = centroid(fa), centroid(fb), centroid(fc)
    beta = math.cos(math.pi / 2 * abs(ka - kb)) * coherence(fa, fb, fc)
    margin = int(margin_factor * size)
    pass_end = int(min(ka, kc) * size - margin)
    stop_start = int(max(ka, kc) * size + margin)
    pass_end = max(0, min(pass_end, size - margin))
    stop_start = min(size, max(stop_start, margin))
    mag_b, phase_b, mag_a = torch.abs(fb), torch.angle(fb), torch.abs(fa)
    mag = torch.where(torch.arange(size) < pass_end, (1 - beta) * mag_a + beta * mag_b, mag_b)
    width = stop_start - pass_end
    if width > 0:
        mag[pass_end:stop_start] *= torch.cos(torch.linspace(0, math.pi / 2, width, dtype=torch.float64))
    return torch.fft.irfft(torch.polar(mag, phase_b), af.shape[0]).reshape(a.shape)


def blur(d, kernel_size):
    # As shipped: d is (rows, 1); the kernel shrinks to 3 and the padding replicates.
    a = d
    min_dim = min(a.shape)
    if kernel_size > min_dim:
        kernel_size = max(3, min_dim - (min_dim % 2 == 0))
    if kernel_size % 2 == 0:
        kernel_size -= 1
    sigma = kernel_size / 3
    x = torch.arange(kernel_size) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1)
    pad = kernel_size // 2
    mode = "replicate" if min_dim <= pad * 2 else "reflect"
    padded = F.pad(a.unsqueeze(1), (pad, pad), mode=mode)
    return F.conv1d(padded.double(), k.double()).squeeze(1)


def view(shape):
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 4:
        return (-1, math.prod(shape[1:]))
    return (-1, shape[-1])


def mda(a, b, c, key, alpha, beta, kernel_size, margin, weight):
    if key.endswith(("in_proj_weight", "in_proj_bias")):
        d = a.shape[0] // 3
        return torch.cat([
            mda(a[i * d:(i + 1) * d], b[i * d:(i + 1) * d], c[i * d:(i + 1) * d], "x", alpha, beta, kernel_size, margin, weight)
            for i in range(3)
        ])
    shape = a.shape
    fb = frequency_aligned(a, b, c, margin)
    v = view(shape)
    a2, b2, c2, f2 = a.reshape(*v), b.reshape(*v), c.reshape(*v), fb.reshape(*v)
    importance = torch.ones_like(a2)  # the shipped guard: min((-1, cols)) > 1 is false
    da, db = a2 - c2, b2 - c2
    na, nb = da.norm(dim=1, keepdim=True), db.norm(dim=1, keepdim=True)
    cos = torch.nan_to_num((da * db).sum(dim=1, keepdim=True) / (torch.max(na, nb) ** 2 + EPS), nan=0)
    dis = blur((1 - cos) / 2, kernel_size)
    bc = f2 * weight + b2 * (1 - weight)
    ea = alpha * importance
    dot = (F.normalize(a2, p=2, dim=-1) * F.normalize(bc, p=2, dim=-1)).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    small = omega < 1e-4
    so = torch.sin(omega).clamp_min(1e-6)
    sa = torch.where(small, 1.0 - ea, torch.sin((1.0 - ea) * omega) / so)
    sb = torch.where(small, ea, torch.sin(ea * omega) / so)
    merged = sa * a2 + sb * bc + (bc - c2) * beta * dis * importance
    return merged.reshape(shape)


PRESETS = {
    "multi_domain_alignment": (3, 0.08, 0.4),
    "multi_domain_alignment_conservative": (3, 0.10, 0.30),
    "multi_domain_alignment_detail": (3, 0.08, 0.40),
    "multi_domain_alignment_smooth": (5, 0.15, 0.25),
}


def filter_top_k(a, k):
    total = a.numel()
    kk = max(int((1 - k) * total), 1)
    if kk >= total:
        return torch.zeros_like(a)
    thr = torch.kthvalue(a.abs().reshape(-1), kk).values
    return a * (a.abs() >= thr)


def ties_sum_extended(deltas, k=0.218, vote_sgn=0.0, apply_median=1.0, weight_decay=0.0218, min_agreement=0.3, eps=1e-6,
                      apply_stock=0.0, cos_eps=1e-6):
    filtered = torch.stack([filter_top_k(d, k) for d in deltas])
    signs = torch.sign(torch.where(filtered.abs() > 1e-7, filtered, torch.zeros_like(filtered)))
    vote = filtered if vote_sgn <= 0.0 else signs
    total = vote.sum(dim=0)
    agreement = (signs != 0).sum(dim=0).double() / len(deltas)
    final = torch.where(agreement >= min_agreement, torch.sign(total), torch.zeros_like(total))
    keep = (signs == final).double()
    counts = keep.sum(dim=0)
    if weight_decay > 0.0:
        filtered = filtered * (1.0 - weight_decay)
    filtered = filtered * keep
    if apply_median <= 0.0:
        t = 1.0
        if apply_stock > 0.0:
            # _compute_model_stock_chunked(_v2): the fraction of the N x N cosines (flattened
            # tensors, each with itself) that are positive.
            flat = filtered.flatten(1)
            norms = flat.norm(dim=1, keepdim=True)
            cos = (flat @ flat.T) / (norms @ norms.T + cos_eps)
            t = torch.sum(cos > 0).item() / (len(deltas) * len(deltas))
        result = filtered.sum(dim=0) * t / torch.clamp(counts, min=eps)
    else:
        result = filtered.mean(dim=0)  # the geometric median's starting point, returned as is
    return torch.nan_to_num(result, nan=0.0, posinf=0.0, neginf=0.0)


def ties_cases(rnd):
    cases = []
    specs = [
        ([6, 8], 3, {}),
        ([6, 8], 5, {"min_agreement": 0.4}),
        ([40], 4, {"k": 0.5, "min_agreement": 0.5, "vote_sgn": 1.0}),
        ([5, 9], 6, {"k": 0.3, "apply_median": 0.0, "weight_decay": 0.1}),
        ([7, 7], 5, {"k": 0.4, "min_agreement": 0.6, "apply_median": 0.0, "vote_sgn": 1.0}),
        # apply_stock: the elected entries share a sign, so two filtered deltas have a positive
        # cosine exactly where their supports meet; a tight trim leaves pairs that do not.
        ([40], 4, {"k": 0.05, "min_agreement": 0.0, "apply_median": 0.0, "apply_stock": 1.0}),
        ([6, 8], 5, {"k": 0.3, "apply_median": 0.0, "apply_stock": 1.0, "weight_decay": 0.1}),
    ]
    for shape, n, over in specs:
        base = rnd(shape)
        models = [base + rnd(shape) for _ in range(n)]
        deltas = [m - base for m in models]
        out = base + ties_sum_extended(deltas, **over)
        cases.append({
            "shape": shape,
            "params": over,
            "base": base.reshape(-1).tolist(),
            "models": [m.reshape(-1).tolist() for m in models],
            "expected": out.reshape(-1).tolist(),
        })
    return cases


def main():
    g = torch.Generator().manual_seed(2026)
    rnd = lambda shape: torch.randn(shape, generator=g, dtype=torch.float64)
    cases = []
    specs = [
        ("model.w", [6, 8], "multi_domain_alignment", {}),
        ("model.w", [5, 7], "multi_domain_alignment", {"alpha": 0.3, "beta": 0.8}),
        ("model.conv", [4, 3, 2, 2], "multi_domain_alignment_smooth", {}),
        ("model.bias", [16], "multi_domain_alignment_conservative", {"alpha": 1.0}),
        ("model.bias", [15], "multi_domain_alignment_detail", {"beta": 0.0}),
        ("model.s", [], "multi_domain_alignment", {}),
        ("text.in_proj_weight", [9, 4], "multi_domain_alignment", {"alpha": 0.7}),
        ("text.in_proj_bias", [12], "multi_domain_alignment", {"frequency_weight": 1.0, "centroid_margin_factor": 0.0}),
        ("model.w", [3, 64], "multi_domain_alignment", {"alpha": 0.0, "beta": 1.0, "centroid_margin_factor": 0.3}),
    ]
    for key, shape, method, over in specs:
        a, b, c = rnd(shape), rnd(shape), rnd(shape)
        if key == "model.w" and shape == [3, 64]:
            b = a + 1e-6 * rnd(shape)  # nearly parallel rows: the linear branch
        k, m, w = PRESETS[method]
        params = {"alpha": 0.5, "beta": 0.5, "kernel_size": k, "centroid_margin_factor": m, "frequency_weight": w}
        params.update(over)
        out = mda(a, b, c, key, params["alpha"], params["beta"], int(params["kernel_size"]),
                  params["centroid_margin_factor"], params["frequency_weight"])
        cases.append({
            "method": method,
            "key": key,
            "shape": shape,
            "params": over,
            "a": a.reshape(-1).tolist(),
            "b": b.reshape(-1).tolist(),
            "c": c.reshape(-1).tolist(),
            "expected": out.reshape(-1).tolist(),
        })
    path = Path(__file__).resolve().parent.parent / "crates/amalgam/tests/fixtures/sd_optim_methods.json"
    ties = ties_cases(rnd)
    path.write_text(json.dumps({
        "source": "sd-optim ba47e65 (multi_domain_alignment, FFT in float64) and 0bbd82a (ties_sum_extended), reimplemented",
        "cases": cases,
        "ties_sum_extended": ties,
    }))
    print(f"{len(cases)} cases -> {path}")


if __name__ == "__main__":
    main()
