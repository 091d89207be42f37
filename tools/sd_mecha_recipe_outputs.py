#!/usr/bin/env python3
"""Reference outputs of sd-mecha for the example `.mecha` recipes, on amalgam's synthetic SDXL models.

Run OFFLINE by hand (not part of CI).  Needs a Python environment with `torch`,
`safetensors`, `numpy` and `sd-mecha==1.1.8`, e.g.

    python3 -m venv /work/venv-mecha
    /work/venv-mecha/bin/pip install torch sd-mecha==1.1.8
    cargo build --release
    /work/venv-mecha/bin/python tools/sd_mecha_recipe_outputs.py \
        [--amalgam target/release/amalgam] [--models-dir /tmp/mecha-ref] \
        [--work-dir /tmp/mecha-recipe-out] [--out crates/amalgam/tests/fixtures/sd_mecha_recipes.json]

What it does:

1. `amalgam synth -o MODELS_DIR --layout sdxl -n 4 --shrink 64 --dtype f32 --seed 0 --force`
   writes base.safetensors and m000..m003.safetensors (real sgm key names, shrunk shapes;
   byte-identical for the same options and seed; their sha256 are stored in the JSON).
2. Every deterministic recipe in crates/amalgam/tests/fixtures/mecha/ is deserialized with
   `sd_mecha.deserialize_path` and merged with
       sd_mecha.merge(recipe, merge_dtype=torch.float64, output_dtype=torch.float32,
                      threads=0, output=WORK_DIR/<name>.safetensors)
   after `sd_mecha.model_dirs.add_path(MODELS_DIR)` (the recipes name the models by relative path).
   sd-mecha infers the model config "sdxl-sgm" from the key names alone; it never compares
   tensor shapes with the config, so the shrunk models merge without any workaround.
3. The output file is read back and, for a fixed sample of keys, the values are stored.

Values are float32 numbers written with the shortest decimal that round-trips to that
float32 (the script checks that parsing the decimal as f64 and rounding to f32 gives the
same bits).  A non-finite float32 is written as the string "inf", "-inf" or "nan".
"""

import argparse
import hashlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sd_mecha

try:
    from importlib.metadata import version as _pkg_version
    SD_MECHA_VERSION = _pkg_version("sd-mecha")
except Exception:  # pragma: no cover
    SD_MECHA_VERSION = getattr(sd_mecha, "__version__", "unknown")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPE_DIR = REPO_ROOT / "crates" / "amalgam" / "tests" / "fixtures" / "mecha"
DEFAULT_OUT = REPO_ROOT / "crates" / "amalgam" / "tests" / "fixtures" / "sd_mecha_recipes.json"
DEFAULT_AMALGAM = REPO_ROOT / "target" / "release" / "amalgam"

RECIPES = [
    "soup.mecha",
    "ties_soup.mecha",
    "geometric_median.mecha",
    "model_stock_gm.mecha",
    "mbw_weighted_sum.mecha",
    "vae_from_base.mecha",
]

SAMPLE_SUBSTRINGS = [
    "input_blocks.4.1.proj_in.weight",
    "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
    "output_blocks.8.0.out_layers.3.bias",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.bias",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias",
    "first_stage_model.decoder.conv_in.bias",
    "first_stage_model.encoder.down.0.block.0.conv1.weight",
]

INPUT_NAMES = ["base", "m000", "m001", "m002", "m003"]

MERGE_KWARGS_TEXT = (
    "sd_mecha.model_dirs.add_path(MODELS_DIR); "
    "recipe = sd_mecha.deserialize_path(pathlib.Path('crates/amalgam/tests/fixtures/mecha/{name}')); "
    "sd_mecha.merge(recipe, merge_dtype=torch.float64, output_dtype=torch.float32, "
    "threads=0, tqdm=<silent>, output=WORK_DIR/'{stem}.safetensors')"
)


class SilentTqdm:
    """Drop-in for tqdm.tqdm that prints nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False

    def update(self, *args, **kwargs):
        pass

    def set_postfix(self, *args, **kwargs):
        pass


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def f32_value(x):
    """A float32 as the shortest decimal that round-trips (as a JSON number), or a string if non-finite."""
    x = np.float32(x)
    if np.isnan(x):
        return "nan"
    if np.isinf(x):
        return "inf" if x > 0 else "-inf"
    v = float(str(x))  # str(np.float32) is the shortest decimal that round-trips to this float32
    if np.float32(v).view(np.uint32) != x.view(np.uint32):
        raise AssertionError(f"f32 round trip failed for {x!r} -> {v!r}")
    return v


def encode_tensor(t):
    a = t.detach().cpu().to(torch.float32).contiguous().numpy().reshape(-1)
    return [f32_value(x) for x in a]


def sample_keys(keys):
    return sorted(k for k in keys if any(s in k for s in SAMPLE_SUBSTRINGS))


def bits_equal(a, b):
    a = a.to(torch.float32).contiguous()
    b = b.to(torch.float32).contiguous()
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def n_bits_differ(a, b):
    a = a.to(torch.float32).contiguous().view(torch.int32)
    b = b.to(torch.float32).contiguous().view(torch.int32)
    return int((a != b).sum())


# --------------------------------------------------------------------------
# per-recipe independent checks (recorded in the JSON, they do not gate it)
# --------------------------------------------------------------------------

RE_INP = re.compile(r"\.input_blocks\.(\d+)\.")
RE_MID = re.compile(r"\.middle_block\.(\d+)\.")
RE_OUT = re.compile(r"\.output_blocks\.(\d+)\.")


def sdxl_block_of(key):
    """Mirror of sd-mecha 1.1.8 convert_sdxl_blocks_to_sgm.map_keys."""
    block = "BASE"
    if key.startswith("model.diffusion_model."):
        block = "OUT08"
        if ".time_embed" in key or ".label_emb" in key:
            block = "BASE"
        elif ".out." in key:
            block = "OUT08"
        elif m := RE_INP.search(key):
            block = f"IN{int(m.group(1)):02}"
        elif RE_MID.search(key):
            block = "M00"
        elif m := RE_OUT.search(key):
            block = f"OUT{int(m.group(1)):02}"
    elif key.startswith("first_stage_model."):
        block = "VAE"
    return block


def check_soup(out, inputs):
    models = [inputs[n] for n in ("m000", "m001", "m002", "m003")]
    differ_keys = 0
    differ_elems = 0
    lerp_chain_equal = True
    for k, v in out.items():
        xs = [m[k].to(torch.float64) for m in models]
        mean = (sum(xs) / 4).to(torch.float32)
        # sd-mecha's n_average is a running lerp: res = lerp(res, x_i, 1/i)
        res = xs[0]
        for i, x in enumerate(xs[1:], start=2):
            res = torch.lerp(res, x, 1 / i)
        lerp_chain_equal &= bits_equal(res, v)
        d = n_bits_differ(mean, v)
        differ_elems += d
        differ_keys += int(d > 0)
    return {
        "equals_running_lerp_f64_then_f32_all_keys": bool(lerp_chain_equal),
        "keys_differing_from_sum_div_4_f64_then_f32": differ_keys,
        "elements_differing_from_sum_div_4_f64_then_f32": differ_elems,
    }


def check_vae_from_base(out, inputs, soup_out):
    vae_keys = [k for k in out if k.startswith("first_stage_model.")]
    other = [k for k in out if not k.startswith("first_stage_model.")]
    return {
        "vae_keys": len(vae_keys),
        "vae_keys_bitwise_equal_base": all(bits_equal(out[k], inputs["base"][k]) for k in vae_keys),
        "non_vae_keys": len(other),
        "non_vae_keys_bitwise_equal_soup_output": (
            all(bits_equal(out[k], soup_out[k]) for k in other) if soup_out is not None else None
        ),
    }


def check_mbw(out, inputs):
    blocks = {"IN00": 0.2, "IN04": 0.5, "M00": 0.8, "OUT08": 1.0}
    fallback_alpha = 0.5
    a_sd, b_sd = inputs["m000"], inputs["m001"]
    per_block = {}
    all_f32_alpha_equal = True
    elems_f64_alpha_differs = 0
    for k, v in out.items():
        block = sdxl_block_of(k)
        alpha = blocks.get(block, fallback_alpha)
        a = a_sd[k].to(torch.float64)
        b = b_sd[k].to(torch.float64)
        if math.isclose(alpha, 0.0):
            exp32 = a
        elif math.isclose(alpha, 1.0):
            exp32 = b
        else:
            exp32 = torch.lerp(a, b, torch.tensor(alpha, dtype=torch.float32))
        exp64 = torch.lerp(a, b, torch.tensor(alpha, dtype=torch.float64))
        eq = bits_equal(exp32, v)
        all_f32_alpha_equal &= eq
        elems_f64_alpha_differs += n_bits_differ(exp64, v)
        s = per_block.setdefault(block, {"alpha": alpha, "keys": 0, "keys_matching": 0})
        s["keys"] += 1
        s["keys_matching"] += int(eq)
    return {
        "rule": "alpha(key) = blocks[convert_sdxl_blocks_to_sgm block of key] if present, else 0.5 (fallback); "
                "out = lerp(m000, m001, alpha) in float64 with alpha a float32 0-d tensor; "
                "alpha isclose 0 -> m000, isclose 1 -> m001 verbatim",
        "all_keys_bitwise_equal_rule": bool(all_f32_alpha_equal),
        "elements_differing_if_alpha_were_float64": elems_f64_alpha_differs,
        "per_block": dict(sorted(per_block.items())),
    }


def check_ties_threshold(inputs):
    """ties_sum k=1.0: filter_top_k keeps |d| >= float32(min |d|); counts keys where that drops an element."""
    base = inputs["base"]
    keys_affected = 0
    elems_dropped = 0
    for k in base:
        for n in ("m000", "m001", "m002", "m003"):
            d = inputs[n][k].to(torch.float64) - base[k].to(torch.float64)
            kth = d.flatten().abs().float().kthvalue(1)[0]
            dropped = int((d.abs() < kth).sum())
            if dropped:
                keys_affected += 1
                elems_dropped += dropped
    return {
        "note": "sd-mecha filter_top_k(k=1.0) takes kthvalue(1) of |delta| after .float(); when that float32 rounds "
                "up, the delta elements below it are zeroed before the sign vote",
        "key_model_pairs_with_dropped_elements": keys_affected,
        "elements_dropped": elems_dropped,
    }


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--amalgam", default=str(DEFAULT_AMALGAM))
    ap.add_argument("--models-dir", default="/tmp/mecha-ref")
    ap.add_argument("--work-dir", default="/tmp/mecha-recipe-out")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()

    amalgam = pathlib.Path(args.amalgam)
    if not amalgam.exists():
        sys.exit(f"{amalgam} not found: run `cargo build --release` first (or pass --amalgam)")
    models_dir = pathlib.Path(args.models_dir).resolve()
    work_dir = pathlib.Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)

    synth_args = ["synth", "-o", str(models_dir), "--layout", "sdxl", "-n", "4", "--shrink", "64",
                  "--dtype", "f32", "--seed", "0", "--force"]
    subprocess.run([str(amalgam)] + synth_args, check=True, stdout=subprocess.DEVNULL)
    synth_cmd = "amalgam " + " ".join(synth_args).replace(str(models_dir), "<MODELS_DIR>")

    inputs = {n: load_file(str(models_dir / f"{n}.safetensors")) for n in INPUT_NAMES}
    input_keys = set(inputs["base"])
    for n in INPUT_NAMES:
        assert set(inputs[n]) == input_keys, f"{n} has a different key set"

    sd_mecha.model_dirs.add_path(models_dir)
    torch.set_num_threads(1)  # deterministic CPU reductions

    results = []
    outputs = {}
    for name in RECIPES:
        stem = name[: -len(".mecha")]
        out_path = work_dir / f"{stem}.safetensors"
        print(f"merging {name}", file=sys.stderr)
        recipe = sd_mecha.deserialize_path(RECIPE_DIR / name)
        try:
            sd_mecha.merge(
                recipe,
                merge_dtype=torch.float64,
                output_dtype=torch.float32,
                threads=0,
                tqdm=SilentTqdm,
                output=out_path,
            )
        except Exception as e:  # record, keep going
            results.append({"recipe": name, "ran": False, "error": f"{type(e).__name__}: {e}"})
            continue

        out = load_file(str(out_path))
        outputs[stem] = out
        with safe_open(str(out_path), "pt") as f:
            meta = f.metadata() or {}
        out_keys = set(out)
        nonfinite = {}
        for k in sorted(out):
            v = out[k]
            if not torch.isfinite(v).all():
                nonfinite[k] = {
                    "shape": list(v.shape),
                    "pos_inf": int(torch.isposinf(v).sum()),
                    "neg_inf": int(torch.isneginf(v).sum()),
                    "nan": int(torch.isnan(v).sum()),
                }
        samples = []
        for k in sample_keys(out_keys):
            t = out[k]
            samples.append({"key": k, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                            "values": encode_tensor(t)})
        entry = {
            "recipe": name,
            "ran": True,
            "sd_mecha_call": MERGE_KWARGS_TEXT.format(name=name, stem=stem),
            "finalized_recipe": meta.get("mecha_recipe"),
            "output": {
                "key_count": len(out_keys),
                "input_key_count": len(input_keys),
                "all_input_keys_present": input_keys <= out_keys,
                "missing_input_keys": sorted(input_keys - out_keys),
                "extra_keys": sorted(out_keys - input_keys),
                "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in out.values()}),
                "shapes_equal_input_shapes": all(
                    tuple(out[k].shape) == tuple(inputs["base"][k].shape) for k in out_keys & input_keys),
                "non_finite_keys": nonfinite,
            },
            "samples": samples,
        }
        if stem == "soup":
            entry["checks"] = check_soup(out, inputs)
        elif stem == "vae_from_base":
            entry["checks"] = check_vae_from_base(out, inputs, outputs.get("soup"))
        elif stem == "mbw_weighted_sum":
            entry["checks"] = check_mbw(out, inputs)
        elif stem == "ties_soup":
            entry["checks"] = check_ties_threshold(inputs)
        results.append(entry)

    doc = {
        "generator": "tools/sd_mecha_recipe_outputs.py",
        "sd_mecha_version": SD_MECHA_VERSION,
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "synth_command": synth_cmd,
        "inputs_sha256": {f"{n}.safetensors": sha256(models_dir / f"{n}.safetensors") for n in INPUT_NAMES},
        "merge_dtype": "float64",
        "output_dtype": "float32",
        "sample_substrings": SAMPLE_SUBSTRINGS,
        "value_encoding": "row-major flat list of float32 values, each the shortest decimal that round-trips "
                          "to the same float32 (parse as f64 then cast to f32, or as f32); non-finite values "
                          "are the strings \"inf\", \"-inf\", \"nan\"",
        "recipes": results,
    }
    out_file = pathlib.Path(args.out)
    out_file.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out_file} ({out_file.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
