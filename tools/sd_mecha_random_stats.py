#!/usr/bin/env python3
"""Statistics of sd-mecha's outputs for the two RANDOM example recipes (tgmd, dgmla).

Run OFFLINE by hand (not part of CI).  Same environment as tools/sd_mecha_recipe_outputs.py:

    python3 -m venv /work/venv-mecha
    /work/venv-mecha/bin/pip install torch sd-mecha==1.1.8
    cargo build --release
    /work/venv-mecha/bin/python tools/sd_mecha_random_stats.py \
        [--amalgam target/release/amalgam] [--models-dir /tmp/mecha-ref] \
        [--work-dir /tmp/mecha-random-out] [--seeds 1,2,3] [--min-numel 4096] \
        [--out crates/amalgam/tests/fixtures/sd_mecha_random_stats.json]

tgmd.mecha (DARE masks + TIES + geometric median) and dgmla.mecha (DELLA masks + TIES +
geometric median) draw Bernoulli masks from torch's CPU generator, so amalgam cannot
reproduce their outputs bit for bit.  This script records statistics a Rust test can
compare against instead:

1. The input models are amalgam's synthetic SDXL models
       amalgam synth -o MODELS_DIR --layout sdxl -n 4 --shrink 64 --dtype f32 --seed 0 --force
   (run only when MODELS_DIR lacks one of the five files, or with --resynth; the sha256 of
   the inputs are stored in the JSON).
2. Each recipe is merged as in tools/sd_mecha_recipe_outputs.py:
       sd_mecha.model_dirs.add_path(MODELS_DIR)
       recipe = sd_mecha.deserialize_path(path)
       sd_mecha.merge(recipe, merge_dtype=torch.float64, output_dtype=torch.float32,
                      threads=0, output=WORK_DIR/...)
   once with the recipe file as is (its original seed), and once per extra seed with a
   temporary copy of the recipe in WORK_DIR whose seed line `dict key=<seed>` is replaced.
3. For every floating-point output key with at least --min-numel elements, with
   delta = float64(output) - float64(base) and
   mean_tv = mean over m000..m003 of (float64(m_i) - float64(base)):
     changed_fraction   = count(float32 output != float32 base) / numel   (value comparison)
     mean_delta         = mean(delta)
     std_delta          = population standard deviation of delta (ddof = 0)
     mean_abs_delta     = mean(|delta|)
     cos_to_mean_delta  = <delta, mean_tv> / (|delta| |mean_tv|) over the whole tensor
                          (null when a norm is 0)
   all in float64.  The seed-to-seed spread is the SAMPLE standard deviation (ddof = 1)
   across the original seed and the extra seeds.

Floats are rounded to 6 significant digits.
"""

import argparse
import hashlib
import json
import math
import pathlib
import statistics
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

import sd_mecha

try:
    from importlib.metadata import version as _pkg_version
    SD_MECHA_VERSION = _pkg_version("sd-mecha")
except Exception:  # pragma: no cover
    SD_MECHA_VERSION = getattr(sd_mecha, "__version__", "unknown")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPE_DIR = REPO_ROOT / "crates" / "amalgam" / "tests" / "fixtures" / "mecha"
DEFAULT_OUT = REPO_ROOT / "crates" / "amalgam" / "tests" / "fixtures" / "sd_mecha_random_stats.json"
DEFAULT_AMALGAM = REPO_ROOT / "target" / "release" / "amalgam"

# recipe file -> its original seed literal (the line `dict key=<seed>` in the file)
RECIPES = {
    "tgmd.mecha": 240603,
    "dgmla.mecha": 241011,
}

INPUT_NAMES = ["base", "m000", "m001", "m002", "m003"]
MODEL_NAMES = ["m000", "m001", "m002", "m003"]

# extra thresholds for the supplementary aggregates (the main per-key list uses --min-numel)
AGG_THRESHOLDS = [1, 256, 1024, 4096]

MERGE_CALL_TEXT = (
    "sd_mecha.model_dirs.add_path(MODELS_DIR); "
    "recipe = sd_mecha.deserialize_path(RECIPE_PATH); "
    "sd_mecha.merge(recipe, merge_dtype=torch.float64, output_dtype=torch.float32, "
    "threads=0, tqdm=<silent>, output=WORK_DIR/'<stem>_seed<seed>.safetensors')"
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

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def r6(x):
    """Round to 6 significant digits; None stays None; non-finite -> string."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.6g}")


def mean_or_none(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def median_or_none(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def sample_std(xs):
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) >= 2 else None


def seeded_recipe_text(text, orig_seed, seed):
    old = f"dict key={orig_seed}"
    lines = text.split("\n")
    hits = [i for i, line in enumerate(lines) if line.strip() == old]
    if len(hits) != 1:
        raise RuntimeError(f"expected exactly one line {old!r}, found {len(hits)}")
    lines[hits[0]] = lines[hits[0]].replace(old, f"dict key={seed}")
    return "\n".join(lines)


def key_stats(out, base, mean_tv):
    """Per-key statistics (python floats, unrounded) plus pooled sums for aggregation."""
    o32 = out.to(torch.float32)
    b32 = base.to(torch.float32)
    n = o32.numel()
    changed = int((o32 != b32).sum())
    d = o32.to(torch.float64) - b32.to(torch.float64)
    d = d.flatten()
    tv = mean_tv.flatten()
    mean_delta = float(d.mean())
    std_delta = float(d.std(unbiased=False)) if n > 0 else None
    abs_sum = float(d.abs().sum())
    tv_abs_sum = float(tv.abs().sum())
    dot = float(torch.dot(d, tv))
    nd = float(torch.linalg.vector_norm(d))
    nt = float(torch.linalg.vector_norm(tv))
    cos = dot / (nd * nt) if nd > 0 and nt > 0 else None
    ratio = (abs_sum / tv_abs_sum) if tv_abs_sum > 0 else None
    return {
        "numel": n,
        "changed_count": changed,
        "changed_fraction": changed / n,
        "mean_delta": mean_delta,
        "std_delta": std_delta,
        "mean_abs_delta": abs_sum / n,
        "mean_abs_mean_task_vector": tv_abs_sum / n,
        "abs_ratio": ratio,
        "cos_to_mean_delta": cos,
        # pooled sums (not written per key)
        "_abs_sum": abs_sum,
        "_tv_abs_sum": tv_abs_sum,
        "_dot": dot,
        "_nd2": nd * nd,
        "_nt2": nt * nt,
    }


def aggregate(stats_by_key, keys):
    """Aggregate values over `keys` (unrounded)."""
    sel = [stats_by_key[k] for k in keys]
    if not sel:
        return None
    n = sum(s["numel"] for s in sel)
    abs_sum = sum(s["_abs_sum"] for s in sel)
    tv_abs_sum = sum(s["_tv_abs_sum"] for s in sel)
    dot = sum(s["_dot"] for s in sel)
    nd2 = sum(s["_nd2"] for s in sel)
    nt2 = sum(s["_nt2"] for s in sel)
    return {
        "key_count": len(sel),
        "numel": n,
        "mean_changed_fraction": mean_or_none([s["changed_fraction"] for s in sel]),
        "median_abs_ratio": median_or_none([s["abs_ratio"] for s in sel]),
        "mean_cos_to_mean_delta": mean_or_none([s["cos_to_mean_delta"] for s in sel]),
        "pooled_changed_fraction": sum(s["changed_count"] for s in sel) / n,
        "pooled_abs_ratio": abs_sum / tv_abs_sum if tv_abs_sum > 0 else None,
        "pooled_cos_to_mean_delta": dot / math.sqrt(nd2 * nt2) if nd2 > 0 and nt2 > 0 else None,
    }


AGG_FIELDS = [
    "mean_changed_fraction", "median_abs_ratio", "mean_cos_to_mean_delta",
    "pooled_changed_fraction", "pooled_abs_ratio", "pooled_cos_to_mean_delta",
]


def round_agg(a):
    if a is None:
        return None
    return {k: (v if k in ("key_count", "numel") else r6(v)) for k, v in a.items()}


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--amalgam", default=str(DEFAULT_AMALGAM))
    ap.add_argument("--models-dir", default="/tmp/mecha-ref")
    ap.add_argument("--work-dir", default="/tmp/mecha-random-out")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--seeds", default="1,2,3", help="extra seeds, comma separated")
    ap.add_argument("--min-numel", type=int, default=4096)
    ap.add_argument("--resynth", action="store_true", help="always regenerate the input models")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="subset of recipes, comma separated")
    args = ap.parse_args()

    t_start = time.perf_counter()
    extra_seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    models_dir = pathlib.Path(args.models_dir).resolve()
    work_dir = pathlib.Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)

    synth_args = ["synth", "-o", str(models_dir), "--layout", "sdxl", "-n", "4", "--shrink", "64",
                  "--dtype", "f32", "--seed", "0", "--force"]
    synth_cmd = "amalgam " + " ".join(synth_args).replace(str(models_dir), "<MODELS_DIR>")
    missing = [n for n in INPUT_NAMES if not (models_dir / f"{n}.safetensors").exists()]
    if missing or args.resynth:
        amalgam = pathlib.Path(args.amalgam)
        if not amalgam.exists():
            sys.exit(f"{amalgam} not found: run `cargo build --release` first (or pass --amalgam)")
        print(f"synthesizing input models into {models_dir}", file=sys.stderr)
        subprocess.run([str(amalgam)] + synth_args, check=True, stdout=subprocess.DEVNULL)

    inputs_sha = {f"{n}.safetensors": sha256_file(models_dir / f"{n}.safetensors") for n in INPUT_NAMES}
    # cross-check with the deterministic-recipe fixture, if it is there
    ref_fixture = REPO_ROOT / "crates" / "amalgam" / "tests" / "fixtures" / "sd_mecha_recipes.json"
    inputs_match_recipes_fixture = None
    if ref_fixture.exists():
        try:
            inputs_match_recipes_fixture = json.loads(ref_fixture.read_text()).get("inputs_sha256") == inputs_sha
        except Exception:
            pass
        if inputs_match_recipes_fixture is False:
            print("WARNING: input sha256 differ from sd_mecha_recipes.json", file=sys.stderr)

    inputs = {n: load_file(str(models_dir / f"{n}.safetensors")) for n in INPUT_NAMES}
    base = inputs["base"]
    for n in INPUT_NAMES:
        assert set(inputs[n]) == set(base), f"{n} has a different key set"

    float_keys = sorted(k for k, v in base.items() if v.is_floating_point())
    mean_tv = {}
    for k in float_keys:
        b = base[k].to(torch.float64)
        mean_tv[k] = sum(inputs[n][k].to(torch.float64) - b for n in MODEL_NAMES) / len(MODEL_NAMES)

    sd_mecha.model_dirs.add_path(models_dir)
    torch.set_num_threads(1)  # deterministic CPU reductions / RNG use, as in sd_mecha_recipe_outputs.py

    recipes_out = []
    for name in [r for r in args.recipes.split(",") if r]:
        orig_seed = RECIPES[name]
        stem = name[: -len(".mecha")]
        recipe_path = RECIPE_DIR / name
        recipe_text = recipe_path.read_text()
        seeds = [orig_seed] + extra_seeds
        per_seed = {}        # seed -> {key -> stats}
        per_seed_meta = {}
        for seed in seeds:
            if seed == orig_seed:
                path = recipe_path
            else:
                path = work_dir / f"{stem}_seed{seed}.mecha"
                path.write_text(seeded_recipe_text(recipe_text, orig_seed, seed))
            out_path = work_dir / f"{stem}_seed{seed}.safetensors"
            print(f"merging {name} seed={seed}", file=sys.stderr)
            t0 = time.perf_counter()
            recipe = sd_mecha.deserialize_path(path)
            sd_mecha.merge(
                recipe,
                merge_dtype=torch.float64,
                output_dtype=torch.float32,
                threads=0,
                tqdm=SilentTqdm,
                output=out_path,
            )
            merge_s = time.perf_counter() - t0
            out = load_file(str(out_path))
            if set(out) != set(base):
                raise RuntimeError(f"{name} seed {seed}: output key set differs from the inputs "
                                   f"(missing {sorted(set(base) - set(out))[:5]}, extra {sorted(set(out) - set(base))[:5]})")
            nonfinite = sum(int((~torch.isfinite(out[k])).sum()) for k in float_keys)
            per_seed[seed] = {k: key_stats(out[k], base[k], mean_tv[k]) for k in float_keys}
            per_seed_meta[seed] = {
                "merge_seconds": round(merge_s, 2),
                "output_dtypes": sorted({str(v.dtype).replace("torch.", "") for v in out.values()}),
                "non_finite_elements": nonfinite,
                "output_sha256": sha256_file(out_path),
            }
            print(f"  {merge_s:.1f} s", file=sys.stderr)

        main_stats = per_seed[orig_seed]
        sel_keys = [k for k in float_keys if main_stats[k]["numel"] >= args.min_numel]

        keys_out = []
        for k in sel_keys:
            s = main_stats[k]
            mad = [per_seed[sd][k]["mean_abs_delta"] for sd in seeds]
            cos = [per_seed[sd][k]["cos_to_mean_delta"] for sd in seeds]
            cf = [per_seed[sd][k]["changed_fraction"] for sd in seeds]
            keys_out.append({
                "key": k,
                "numel": s["numel"],
                "changed_fraction": r6(s["changed_fraction"]),
                "mean_delta": r6(s["mean_delta"]),
                "std_delta": r6(s["std_delta"]),
                "mean_abs_delta": r6(s["mean_abs_delta"]),
                "cos_to_mean_delta": r6(s["cos_to_mean_delta"]),
                "mean_abs_mean_task_vector": r6(s["mean_abs_mean_task_vector"]),
                "abs_ratio": r6(s["abs_ratio"]),
                "seed_std_mean_abs_delta": r6(sample_std(mad)),
                "seed_std_cos_to_mean_delta": r6(sample_std(cos)),
                "seed_std_changed_fraction": r6(sample_std(cf)),
                "per_seed_mean_abs_delta": [r6(x) for x in mad],
                "per_seed_cos_to_mean_delta": [r6(x) for x in cos],
            })

        # aggregates, per seed, and their spread
        def agg_block(keys):
            per = {sd: aggregate(per_seed[sd], keys) for sd in seeds}
            if per[orig_seed] is None:
                return None
            spread = {}
            for f in AGG_FIELDS:
                vals = [per[sd][f] for sd in seeds]
                spread[f] = {"mean": r6(mean_or_none(vals)), "std": r6(sample_std(vals)),
                             "min": r6(min(v for v in vals if v is not None)) if any(v is not None for v in vals) else None,
                             "max": r6(max(v for v in vals if v is not None)) if any(v is not None for v in vals) else None}
            return {
                "original_seed": round_agg(per[orig_seed]),
                "per_seed": {str(sd): round_agg(per[sd]) for sd in seeds},
                "across_seeds": spread,
            }

        main_agg = agg_block(sel_keys)
        by_threshold = {}
        for thr in AGG_THRESHOLDS:
            ks = [k for k in float_keys if main_stats[k]["numel"] >= thr]
            by_threshold[str(thr)] = agg_block(ks)

        # typical per-key seed spread, relative, over the selected keys
        rel_mad_spread = []
        for k in sel_keys:
            sd_ = sample_std([per_seed[sd][k]["mean_abs_delta"] for sd in seeds])
            if sd_ is not None and main_stats[k]["mean_abs_delta"] > 0:
                rel_mad_spread.append(sd_ / main_stats[k]["mean_abs_delta"])
        cos_spread = [c for c in (sample_std([per_seed[sd][k]["cos_to_mean_delta"] for sd in seeds])
                                  for k in sel_keys) if c is not None]

        recipes_out.append({
            "recipe": name,
            "recipe_sha256": sha256_file(recipe_path),
            "original_seed": orig_seed,
            "seed_line": f"dict key={orig_seed}",
            "seeds": seeds,
            "sd_mecha_call": MERGE_CALL_TEXT,
            "runs": {str(sd): per_seed_meta[sd] for sd in seeds},
            "aggregate": round_agg(main_agg["original_seed"]) if main_agg else None,
            "aggregate_across_seeds": main_agg["across_seeds"] if main_agg else None,
            "aggregate_per_seed": main_agg["per_seed"] if main_agg else None,
            "seed_spread_summary": {
                "median_rel_seed_std_mean_abs_delta": r6(median_or_none(rel_mad_spread)),
                "max_rel_seed_std_mean_abs_delta": r6(max(rel_mad_spread) if rel_mad_spread else None),
                "median_seed_std_cos_to_mean_delta": r6(median_or_none(cos_spread)),
                "max_seed_std_cos_to_mean_delta": r6(max(cos_spread, default=None)),
            },
            "aggregate_by_min_numel": by_threshold,
            "keys": keys_out,
        })

    doc = {
        "generator": "tools/sd_mecha_random_stats.py",
        "sd_mecha_version": SD_MECHA_VERSION,
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "torch_num_threads": 1,
        "synth_command": synth_cmd,
        "inputs_sha256": inputs_sha,
        "inputs_match_sd_mecha_recipes_json": inputs_match_recipes_fixture,
        "merge_dtype": "float64",
        "output_dtype": "float32",
        "min_numel": args.min_numel,
        "float_key_count": len(float_keys),
        "definitions": {
            "delta": "float64(output) - float64(base), base = base.safetensors",
            "mean_task_vector": "mean over m000..m003 of float64(m_i) - float64(base), computed in float64",
            "changed_fraction": "count(float32 output != float32 base, value comparison) / numel",
            "mean_delta": "mean(delta), float64",
            "std_delta": "population standard deviation (ddof=0) of delta, float64",
            "mean_abs_delta": "mean(|delta|), float64",
            "mean_abs_mean_task_vector": "mean(|mean_task_vector|), float64",
            "abs_ratio": "mean_abs_delta / mean_abs_mean_task_vector",
            "cos_to_mean_delta": "<delta, mean_task_vector> / (|delta| * |mean_task_vector|), whole tensor flattened, "
                                 "float64; null if a norm is 0",
            "seed_std_*": "sample standard deviation (ddof=1) across the recipe's seeds (original seed first, "
                          "then the extra seeds) of the per-key value",
            "per_seed_*": "the per-key value for each seed, in the order of `seeds`",
            "aggregate.mean_changed_fraction": "mean over the selected keys of changed_fraction",
            "aggregate.median_abs_ratio": "median over the selected keys of abs_ratio",
            "aggregate.mean_cos_to_mean_delta": "mean over the selected keys of cos_to_mean_delta",
            "aggregate.pooled_*": "the same quantities with all selected keys' elements pooled into one vector",
            "aggregate": "over the keys listed in `keys` (numel >= min_numel), original seed",
            "aggregate_across_seeds": "mean / sample std / min / max of each aggregate value over the seeds",
            "aggregate_by_min_numel": "the same aggregate blocks over all float keys with numel >= the given threshold",
            "seed_spread_summary": "over the listed keys: median and max of seed_std_mean_abs_delta / mean_abs_delta, "
                                   "and of seed_std_cos_to_mean_delta",
        },
        "float_format": "6 significant digits",
        "recipes": recipes_out,
    }
    doc["runtime_seconds"] = round(time.perf_counter() - t_start, 1)
    out_file = pathlib.Path(args.out)
    text = json.dumps(doc, indent=1) + "\n"
    if len(text.encode()) >= 1_000_000:
        sys.exit(f"JSON would be {len(text.encode())} bytes (>= 1 MB); raise --min-numel")
    out_file.write_text(text)
    print(f"wrote {out_file} ({out_file.stat().st_size} bytes) in {doc['runtime_seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
