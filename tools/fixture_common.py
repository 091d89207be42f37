"""Helpers the fixture scripts share (imported from beside them: run the scripts as
`python tools/NAME.py`)."""

import math

import torch


def enc(t):
    """A tensor as a fixture value: {"shape", "values"} in float64, row-major; a non-finite
    value is an error (JSON has none)."""
    t = t.detach().to(torch.float64).cpu()
    vals = t.reshape(-1).tolist()
    for v in vals:
        if not math.isfinite(v):
            raise ValueError(f"non-finite value in fixture: {v}")
    return {"shape": list(t.shape), "values": vals}
