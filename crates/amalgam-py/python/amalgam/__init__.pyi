"""Type stubs of the amalgam package (see ``__init__.py`` for the documentation)."""

import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

PathLike = Union[str, os.PathLike[str]]
Progress = Callable[[int, int, str], Any]

__version__: str

class MergeError(Exception):
    """A merge, read or check failed. ``path``, ``key`` and ``node`` name what the error is
    about, where it names them (else ``None``)."""

    path: Optional[str]
    key: Optional[str]
    node: Optional[str]

class InputError(MergeError): ...
class RecipeError(MergeError): ...
class OutputError(MergeError): ...
class CancelledError(MergeError): ...

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
) -> Any:
    """Merges models; returns the report (a dict), or with ``output=None`` the merged tensors
    (a dict of name to numpy array, or torch tensor when torch is installed)."""

def merge_mecha(recipe: Any, *, output: Optional[PathLike], **options: Any) -> Any:
    """Runs an sd-mecha recipe (object, ``.mecha`` text or path) natively."""

def inspect(path: PathLike, *, hashes: bool = True) -> Dict[str, Any]:
    """What ``amalgam inspect --json`` reports."""

def methods() -> list:
    """Every method's declaration (name, formula, inputs, parameters with defaults and types)."""

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
    """What ``amalgam compare`` measures; with ``output_dir``, its report files too."""

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
    """``model - base`` as a kohya LoRA file; returns the report."""

def tqdm_progress(**tqdm_options: Any) -> Progress:
    """A progress callback drawing a tqdm bar."""
