"""The Python package end to end, on real safetensors files synthesised by the `amalgam`
binary (AMALGAM_BIN, else `amalgam` on PATH)."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import amalgam

BIN = os.environ.get("AMALGAM_BIN") or shutil.which("amalgam")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    subprocess.run(
        [BIN, "synth", "-o", str(d), "--layout", "sd1", "-n", "3", "--shrink", "16"],
        check=True,
        capture_output=True,
    )
    return d


def files(d):
    return [str(d / f"m00{i}.safetensors") for i in range(3)]


def test_merge_writes_the_cli_bytes(pool, tmp_path):
    out_py = tmp_path / "py.safetensors"
    out_cli = tmp_path / "cli.safetensors"
    report = amalgam.merge(
        method="ties_soup",
        models=files(pool),
        base=pool / "base.safetensors",
        params={"k": 0.5},
        output=out_py,
        seed=3,
    )
    assert report["output"] == str(out_py.resolve()) or report["output"].endswith("py.safetensors")
    subprocess.run(
        [BIN, "merge", "--method", "ties_soup", "--base", str(pool / "base.safetensors"),
         *files(pool), "--param", "k=0.5", "--seed", "3", "-o", str(out_cli), "-q"],
        check=True,
    )
    assert out_py.read_bytes() == out_cli.read_bytes()


def test_progress_is_monotonic_and_ends_at_the_total(pool, tmp_path):
    seen = []
    amalgam.merge(method="soup", models=files(pool), output=tmp_path / "s.safetensors",
                  progress=lambda done, total, key: seen.append((done, total)))
    assert len(seen) > 2
    dones = [d for d, _ in seen]
    assert dones == sorted(dones)
    assert seen[-1][0] == seen[-1][1] > 0


def test_a_raising_callback_cancels_and_leaves_no_file(pool, tmp_path):
    out = tmp_path / "c.safetensors"

    def stop(done, total, key):
        if done > 0:
            raise KeyboardInterrupt("stop here")

    with pytest.raises(KeyboardInterrupt, match="stop here"):
        amalgam.merge(method="soup", models=files(pool), output=out, progress=stop)
    assert os.listdir(tmp_path) == []


def test_in_memory_arrays_equal_the_written_file(pool, tmp_path):
    out = tmp_path / "w.safetensors"
    amalgam.merge(method="soup", models=files(pool), output=out)
    arrays = amalgam.merge(method="soup", models=files(pool), output=None, as_torch=False)
    written = {name: (dtype, shape, buf) for name, dtype, shape, buf in amalgam._native.read_tensors(str(out))}
    assert set(arrays) == set(written)
    for name, a in arrays.items():
        dtype, shape, buf = written[name]
        assert list(a.shape) == shape
        assert a.tobytes() == bytes(buf)
    assert arrays["model.diffusion_model.out.2.bias"].dtype == np.float16


def test_errors_are_python_exceptions_naming_the_file(pool, tmp_path):
    with pytest.raises(amalgam.InputError) as e:
        amalgam.merge(method="soup", models=[*files(pool), str(tmp_path / "missing.safetensors")],
                      output=tmp_path / "x.safetensors")
    assert "missing.safetensors" in str(e.value)
    with pytest.raises(amalgam.RecipeError, match="unknown method"):
        amalgam.merge(method="no_such_method", models=files(pool), output=tmp_path / "x.safetensors")
    out = tmp_path / "y.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(amalgam.OutputError) as e:
        amalgam.merge(method="soup", models=files(pool), output=out)
    assert e.value.path == str(out)
    assert out.read_bytes() == b"keep me"
    assert issubclass(amalgam.OutputError, amalgam.MergeError)


def test_recipe_text_and_methods_and_inspect_and_compare(pool, tmp_path):
    recipe = f"""
[models]
pool = {json.dumps(files(pool))}

[nodes.avg]
method = "soup"
models = "pool"

[output]
node = "avg"
"""
    a = amalgam.merge(recipe, output=tmp_path / "r.safetensors")
    b = amalgam.merge(method="soup", models=files(pool), output=tmp_path / "s.safetensors")
    assert a["output"] and b["output"]
    ms = {m["name"]: m for m in amalgam.methods()}
    assert ms["dgmla"]["preset_of"] == "ties"
    assert any(p["name"] == "p" and p["default"] == "0.1" for p in ms["dgmla"]["params"])
    info = amalgam.inspect(tmp_path / "r.safetensors", hashes=False)
    assert "amalgam_recipe" in info["metadata"]
    c = amalgam.compare(files(pool), base=pool / "base.safetensors", output_dir=tmp_path / "cmp")
    assert len(c["models"]) == 3 and c["total"]["models"][0]["dist_base"] > 0
    assert (tmp_path / "cmp" / "report.html").is_file()


FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "amalgam", "tests", "fixtures")


def test_extract_lora_writes_a_lora(pool, tmp_path):
    out = tmp_path / "l.safetensors"
    report = amalgam.extract_lora(pool / "m000.safetensors", base=pool / "base.safetensors",
                                  output=out, rank=4)
    assert out.is_file() and report
    keys = {name for name, _, _, _ in amalgam._native.read_tensors(str(out))}
    assert any(k.endswith("lora_down.weight") for k in keys)


def test_merge_mecha_equals_sd_mecha_outputs(tmp_path):
    """The recipes sd-mecha 1.1.8 serialised (tests/fixtures/sd_mecha_recipes.json, made offline
    by tools/sd_mecha_recipe_outputs.py), run natively, against sd-mecha's own outputs."""
    import hashlib

    with open(os.path.join(FIXTURES, "sd_mecha_recipes.json")) as f:
        fx = json.load(f)
    assert fx["sd_mecha_version"] == "1.1.8"
    d = tmp_path / "models"
    subprocess.run(
        [BIN, "synth", "-o", str(d), "--layout", "sdxl", "-n", "4", "--shrink", "64",
         "--dtype", "f32", "--seed", "0", "--force"],
        check=True, capture_output=True,
    )
    for name, digest in fx["inputs_sha256"].items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest, name
    compared = 0
    for r in fx["recipes"]:
        text = r["finalized_recipe"]  # sd_mecha.serialize's text
        tensors = amalgam.merge_mecha(text, output=None, model_dirs=[d], dtype="f32",
                                      compute_dtype="f64", as_torch=False)
        assert len(tensors) == r["output"]["key_count"], r["recipe"]
        for s in r["samples"]:
            want = np.array([float(v) for v in s["values"]], dtype=np.float32)
            got = tensors[s["key"]].reshape(-1)
            scale = max(float(np.abs(want).max()), 1e-6)
            assert np.all((got == want) | (np.abs(got - want) <= 2e-6 * scale)), (r["recipe"], s["key"])
            compared += 1
    assert compared == 6 * 7


def test_ctrl_c_cancels_a_merge_and_leaves_no_file(pool, tmp_path):
    """A real SIGINT sent to a Python process in the middle of a merge."""
    import signal
    import sys
    import time

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = f"""
import sys, time, amalgam
def slow(done, total, key):
    print("progress", flush=True)
    time.sleep(0.02)
try:
    amalgam.merge(method="soup", models={files(pool)!r}, output={str(out_dir / 'x.safetensors')!r},
                  progress=slow, threads=1)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
print("finished", flush=True)
"""
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "progress"
    time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    rest = p.stdout.read()
    assert p.wait(timeout=60) == 3, rest
    assert "interrupted" in rest
    assert os.listdir(out_dir) == []
