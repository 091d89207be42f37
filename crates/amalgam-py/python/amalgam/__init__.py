"""amalgam: merge many safetensors checkpoints in bounded memory.

The Python face of the amalgam library (the `amalgam` command's engine, in Rust). Every call
releases the GIL while it runs; a progress callback that raises, or Ctrl-C, cancels the run
cleanly and leaves no partial file.

    import amalgam
    report = amalgam.merge(method="ties_soup", models=["a.safetensors", "b.safetensors"],
                           base="base.safetensors", output="out.safetensors")
    tensors = amalgam.merge(recipe="recipe.toml", output=None)   # a dict of arrays
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

from . import _native
from ._native import (
    CancelledError,
    InputError,
    MergeError,
    OutputError,
    RecipeError,
)

__version__ = _native.__version__
__all__ = [
    "merge",
    "merge_mecha",
    "inspect",
    "methods",
    "compare",
    "extract_lora",
    "tqdm_progress",
    "MergeError",
    "InputError",
    "RecipeError",
    "OutputError",
    "CancelledError",
]

PathLike = Union[str, "os.PathLike[str]"]
Progress = Callable[[int, int, str], Any]


def _path(p: Optional[PathLike]) -> Optional[str]:
    return None if p is None else os.fspath(p)


def _budget(b: Union[int, str, None]) -> Optional[str]:
    return None if b is None else str(b)


def merge(
    recipe: Optional[PathLike] = None,
    *,
    output: Optional[PathLike],
    method: Optional[str] = None,
    models: Optional[Sequence[PathLike]] = None,
    base: Optional[PathLike] = None,
    fallback: Optional[PathLike] = None,
    params: Optional[Mapping[str, Any]] = None,
    dtype: Optional[str] = None,
    compute_dtype: Optional[str] = None,
    memory_budget: Union[int, str, None] = None,
    threads: int = 0,
    seed: Optional[int] = None,
    non_finite: Optional[str] = None,
    layout: Optional[str] = None,
    repair: bool = False,
    overwrite: bool = False,
    model_dirs: Sequence[PathLike] = (),
    progress: Optional[Progress] = None,
    as_torch: Optional[bool] = None,
):
    """Merges models, as `amalgam merge` does.

    Either ``recipe`` (a TOML or ``.mecha`` file path, or recipe text) or ``method`` with
    ``models`` (and ``base`` for the methods that take one) and ``params``.

    The options are the command line's: ``dtype`` (f16, bf16, f32, f64), ``compute_dtype``
    (f32, f64), ``memory_budget`` (bytes or "2GiB"), ``threads`` (0: one per core), ``seed``,
    ``non_finite`` (omit, error, keep), ``layout`` (e.g. "sdxl-kohya"), ``repair``,
    ``overwrite``, ``model_dirs`` (where a .mecha recipe's models are looked for).

    ``progress(done_bytes, total_bytes, key)`` is called in order as the output is written.

    With ``output`` a path, writes the file and returns the report (a dict). With
    ``output=None``, returns the merged tensors as a dict of name to array: torch tensors when
    torch is installed (or ``as_torch=True``), else numpy arrays (bf16 tensors then come as
    float32). They are read once from a temporary file, which is removed.
    """
    kwargs = dict(
        recipe=None if recipe is None else os.fspath(recipe),
        method=method,
        models=None if models is None else [os.fspath(m) for m in models],
        base=_path(base),
        fallback=_path(fallback),
        params=None if params is None else json.dumps(dict(params)),
        dtype=dtype,
        compute_dtype=compute_dtype,
        memory_budget=_budget(memory_budget),
        threads=threads,
        seed=seed,
        non_finite=non_finite,
        layout=layout,
        repair=repair,
        overwrite=overwrite,
        model_dirs=[os.fspath(d) for d in model_dirs],
        progress=progress,
    )
    if output is not None:
        return json.loads(_native.merge(os.fspath(output), **kwargs))
    folder = tempfile.mkdtemp(prefix="amalgam-")
    try:
        path = os.path.join(folder, "merged.safetensors")
        _native.merge(path, **kwargs)
        return _arrays(_native.read_tensors(path), as_torch)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _arrays(tensors, as_torch: Optional[bool]) -> Dict[str, Any]:
    """(name, dtype, shape, bytearray) tuples as arrays over the bytearrays, without copying
    (but bf16 for numpy)."""
    torch = None
    if as_torch is not False:
        try:
            import torch  # noqa: F811
        except ImportError:
            if as_torch:
                raise
    out: Dict[str, Any] = {}
    if torch is not None:
        kinds = {
            "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
            "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
        }
        for name, dtype, shape, buf in tensors:
            t = torch.frombuffer(buf, dtype=kinds[dtype]) if len(buf) else torch.empty(0, dtype=kinds[dtype])
            out[name] = t.reshape(shape)
        return out
    import numpy as np

    kinds = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32}
    for name, dtype, shape, buf in tensors:
        if dtype == "BF16":
            raw = np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16
            out[name] = raw.view(np.float32).reshape(shape)
        else:
            out[name] = np.frombuffer(buf, dtype=kinds[dtype]).reshape(shape)
    return out


def merge_mecha(recipe: Any, *, output: Optional[PathLike], **options):
    """Runs an sd-mecha recipe natively: ``recipe`` is an sd-mecha recipe object (serialised
    with ``sd_mecha.serialize``), or ``.mecha`` text or a path. For sd-mecha users this is a
    one-line change: ``sd_mecha.merge(recipe, output=...)`` becomes
    ``amalgam.merge_mecha(recipe, output=...)``. Other options as in :func:`merge`."""
    if not isinstance(recipe, (str, os.PathLike)):
        import sd_mecha  # the recipe object's own serialiser

        recipe = sd_mecha.serialize(recipe)
    return merge(recipe, output=output, **options)


def inspect(path: PathLike, *, hashes: bool = True) -> Dict[str, Any]:
    """What ``amalgam inspect --json`` reports: dtypes, metadata, architecture, hashes (AutoV2,
    AutoV3, legacy; ``hashes=False`` skips reading the file) and the toolkit-style report."""
    return json.loads(_native.inspect(os.fspath(path), hashes))


def methods() -> list:
    """Every method's declaration: name, formula, summary, sources, aliases, inputs, and parameters with their
    type, default and documentation (to build a UI from)."""
    return json.loads(_native.methods())


def compare(
    models: Sequence[PathLike],
    *,
    base: Optional[PathLike] = None,
    output_dir: Optional[PathLike] = None,
    overwrite: bool = False,
    outlier_k: float = 3.0,
    threads: int = 0,
    progress: Optional[Progress] = None,
) -> Dict[str, Any]:
    """What ``amalgam compare`` measures (the ``compare.json`` dict); with ``output_dir``, also
    writes its CSV tables, charts and report.html there."""
    return json.loads(
        _native.compare(
            [os.fspath(m) for m in models], _path(base), _path(output_dir),
            overwrite, outlier_k, threads, progress,
        )
    )


def extract_lora(
    model: PathLike,
    *,
    base: PathLike,
    output: PathLike,
    rank: int,
    ratio: Optional[float] = None,
    energy: Optional[float] = None,
    dtype: str = "f16",
    threads: int = 0,
    overwrite: bool = False,
    progress: Optional[Progress] = None,
) -> Dict[str, Any]:
    """What ``amalgam extract-lora`` does: ``model - base`` as a kohya LoRA (LoCon for
    convolutions) of at most ``rank`` per module (``ratio``: that fraction of each module's full
    rank; ``energy``: the smallest rank keeping that share of the delta's energy); returns the
    report."""
    return json.loads(
        _native.extract_lora(
            os.fspath(model), os.fspath(base), os.fspath(output), rank=rank, ratio=ratio,
            energy=energy, dtype=dtype, threads=threads, overwrite=overwrite, progress=progress,
        )
    )


def tqdm_progress(**tqdm_options) -> Progress:
    """A progress callback drawing a tqdm bar in bytes: ``merge(..., progress=tqdm_progress())``."""
    from tqdm.auto import tqdm

    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, **tqdm_options)

    def update(done: int, total: int, key: str) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        if key:
            bar.set_postfix_str(key, refresh=False)
        if total and done >= total:
            bar.close()

    return update
