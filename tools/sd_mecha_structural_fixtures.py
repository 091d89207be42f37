#!/usr/bin/env python3
"""Differential-test fixtures for sd-mecha 1.1.8's balance_attention (SDXL, sgm keys).

Run OFFLINE by hand (not part of CI), with torch and sd-mecha installed:

    /work/venv-mecha/bin/pip install torch sd-mecha==1.1.8
    /work/venv-mecha/bin/python tools/sd_mecha_structural_fixtures.py

A whole sdxl-sgm checkpoint is far too large for a fixture, so the model is a handful of
attention layers under real SDXL key names with small shapes (heads of 64 rows, as sd-mecha
cuts them): a CLIP-L layer (q/k/v/out with biases), a CLIP-G layer (fused in_proj), a UNet
self-attention and a cross-attention (k and v wider than q), plus keys sd-mecha leaves alone
(a norm, the output biases, the VAE's mid attention). The keys are grouped with sd-mecha's own
regular expressions (`SdxlSgmAttentionBase.*_re`, layer ids as its `map_keys` builds them, keys
in sorted order as its config lists them), and each group goes through sd-mecha's own
`extract_qkvo_sdxl_sgm`, `balance_head_energy` and `return_qkvo_sdxl_sgm`, in float64. A group
of one key (every VAE key: sd-mecha's VAE layer id includes the key's suffix) is returned
unchanged, as sd-mecha's method does.

The inputs are not stored: each key's values come from a counter hash (splitmix64's finaliser,
`values` below) that the Rust test computes the same way. Writes
crates/amalgam/tests/fixtures/sd_mecha_structural.json: {"keys": [{"name", "shape", "scale"}],
"every": 3, "balanced": {name: values}}, each changed key's output at every third element
(row-major, 10 significant digits).
"""

import json
import os
from collections import defaultdict

import numpy as np
import torch

from sd_mecha.extensions.builtin.merge_methods.balance_attention import sdxl_sgm as ba
from sd_mecha.extensions.builtin.merge_methods.balance_attention.algorithms import balance_head_energy

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_PATH = os.path.join(REPO_ROOT, "crates", "amalgam", "tests", "fixtures", "sd_mecha_structural.json")
DT = torch.float64

CLIP_L = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn."
CLIP_G = "conditioner.embedders.1.model.transformer.resblocks.0.attn."
UNET = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0."
VAE = "first_stage_model.encoder.mid.attn_1."
M64 = (1 << 64) - 1
EVERY = 3      # the outputs are recorded at every third element


def mix(x):
    """splitmix64's finaliser of counter x (the Rust test computes the same)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def values(index, n, scale):
    """Key `index`'s n values: 20-bit uniforms in [-0.5, 0.5) times `scale` (a power of two),
    exact in f64 and f32 alike."""
    return [((mix((index << 32) + i) >> 44) / 2.0**20 - 0.5) * scale for i in range(n)]


def spec():
    """(key, shape, scale): one head of 64 rows per layer but two in the self-attention; inputs
    64 wide (65 with a bias column), so every head's Gram matrix has full rank."""
    keys = []
    for p in ("q", "k", "v"):
        keys.append((CLIP_L + f"{p}_proj.weight", [64, 64], 0.25))
        keys.append((CLIP_L + f"{p}_proj.bias", [64], 0.125))
    keys.append((CLIP_L + "out_proj.weight", [8, 64], 0.25))
    keys.append((CLIP_L + "out_proj.bias", [8], 0.125))
    keys.append((CLIP_G + "in_proj_weight", [192, 64], 0.25))
    keys.append((CLIP_G + "in_proj_bias", [192], 0.125))
    keys.append((CLIP_G + "out_proj.weight", [8, 64], 0.25))
    keys.append((CLIP_G + "out_proj.bias", [8], 0.125))
    for attn, rows, ctx in (("attn1", 128, 64), ("attn2", 64, 72)):
        # Queries larger than keys: the balance moves energy between them.
        keys.append((UNET + f"{attn}.to_q.weight", [rows, 64], 1.0))
        keys.append((UNET + f"{attn}.to_k.weight", [rows, ctx], 0.125))
        keys.append((UNET + f"{attn}.to_v.weight", [rows, ctx], 0.25))
        keys.append((UNET + f"{attn}.to_out.0.weight", [8, rows], 0.25))
        keys.append((UNET + f"{attn}.to_out.0.bias", [8], 0.125))
    keys.append((UNET + "norm1.weight", [64], 1.0))
    for p in ("q", "k", "v", "proj_out"):
        keys.append((VAE + f"{p}.weight", [8, 8, 1, 1], 0.25))
        keys.append((VAE + f"{p}.bias", [8], 0.125))
    keys.append((VAE + "norm.weight", [8], 1.0))
    return keys


def model(keys):
    return {k: torch.tensor(values(i, int(np.prod(shape)), scale), dtype=DT).reshape(shape)
            for i, (k, shape, scale) in enumerate(keys)}


def groups(keys):
    """sd-mecha's map_keys: the same regular expressions and layer ids."""
    b = ba.SdxlSgmAttentionBase
    out = defaultdict(list)
    for key in sorted(keys):
        if (m := b.clip_l_re.search(key)) and m.group(2) != "out_proj.bias":
            out[("clip_l", m.group(1))].append(key)
        elif (m := b.clip_g_re.search(key)) and m.group(2) != "out_proj.bias":
            out[("clip_g", m.group(1))].append(key)
        elif (m := b.vae_re.search(key)) and m.group(2) != "proj_out.bias":
            out[("vae", *m.group(1, 2))].append(key)
        elif (m := b.unet_re.search(key)) and m.group(5) != "to_out.0.bias":
            out[("unet", *m.group(1, 2, 3, 4))].append(key)
        else:
            out[(key,)].append(key)
    return list(out.values())


def balance(sd):
    result = {}
    for keys in groups(sd.keys()):
        keys = tuple(keys)
        qkvo = ba.extract_qkvo_sdxl_sgm(sd, keys)
        if qkvo is None:
            result[keys[0]] = sd[keys[0]]
            continue
        q, k, v, o = qkvo
        q, k = balance_head_energy(q, k)
        v, o = balance_head_energy(v, o)
        result.update(ba.return_qkvo_sdxl_sgm(q, k, v, o, keys))
    return result


def main():
    keys = spec()
    sd = model(keys)
    out = balance(sd)
    assert sorted(out) == sorted(sd), "every key is returned"
    changed = sorted(k for k in sd if not torch.equal(sd[k], out[k]))
    fixture = {
        "source": "sd-mecha 1.1.8 balance_attention (sdxl-sgm), float64: "
                  "tools/sd_mecha_structural_fixtures.py",
        "keys": [{"name": k, "shape": shape, "scale": scale} for k, shape, scale in keys],
        "every": EVERY,
        "balanced": {k: [float(f"{v:.10g}") for v in out[k].reshape(-1).tolist()[::EVERY]]
                     for k in changed},
    }
    with open(OUT_PATH, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT_PATH}: {len(sd)} keys, {len(changed)} changed by sd-mecha")


if __name__ == "__main__":
    main()
