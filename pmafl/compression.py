"""Compressed model updates: what a client sends back instead of its whole model.

A client's update is the difference between its trained model and the global model it received,
delta = local - sent. `encode_update` turns it into fewer bytes; `decode_update`, on the server,
rebuilds local = sent + decoded delta, checking every array of the encoded reply first. The
methods (`COMPRESSIONS`):

- `none`: the model itself, float32 (4 bytes per weight).
- `fp16`: the delta in float16 (2 bytes per weight).
- `int8`: the delta linearly quantised per tensor, q = round(delta / s) in [-127, 127] with
  s = max|delta| / 127, sent as int8 plus s as one float32 (about 1 byte per weight).
- `topk`: per tensor, the `ceil(fraction * n)` entries of largest magnitude, as int32 indices and
  float32 values (8 bytes per kept weight: 0.2x of `none` at fraction 0.1).

The lossy methods use error feedback (Seide et al. 2014; Karimireddy et al. 2019, "Error Feedback
Fixes SignSGD"): what a round's encoding dropped, residual = delta + old residual - decoded, is
added to the next round's delta, so nothing a client learnt is lost for good, only delayed. The
caller keeps the residual between rounds (the ClientApp in its node's state).

Only floating-point arrays are compressed; integer buffers (BatchNorm's `num_batches_tracked`)
travel as they are. An encoded array's key is the model's key, plus `|scale`, `|index` or `|value`
for the extra parts (model keys never contain `|`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

COMPRESSIONS = ("none", "fp16", "int8", "topk")
SEP = "|"


def encode_update(local: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor], method: str,
                  topk_fraction: float = 0.1, residual: Mapping[str, torch.Tensor] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoded arrays to send, the new error-feedback residual) for the update local - sent.

    `local` and `sent` are state dicts with the same keys (the trained model and the global model
    received). `residual` is what the previous call returned (None or empty: no residual yet).
    With `none` the encoded arrays are `local` itself and the residual stays empty."""
    if method not in COMPRESSIONS:
        raise ValueError(f"unknown update compression {method!r}; known: {', '.join(COMPRESSIONS)}")
    if not 0 < topk_fraction <= 1:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction!r}")
    if set(local) != set(sent):
        raise ValueError(f"local and sent state dicts differ in keys: "
                         f"{sorted(set(local) ^ set(sent))}")
    if method == "none":
        return {key: value.detach().cpu() for key, value in local.items()}, {}
    residual = residual or {}
    encoded: dict[str, torch.Tensor] = {}
    new_residual: dict[str, torch.Tensor] = {}
    for key, value in local.items():
        if SEP in key:
            raise ValueError(f"state dict key {key!r} contains {SEP!r}, which encoded keys use")
        value = value.detach().cpu()
        if not value.is_floating_point():
            encoded[key] = value
            continue
        delta = value.float() - sent[key].detach().cpu().float()
        if key in residual:
            delta = delta + residual[key].float()
        parts, decoded = _encode_tensor(delta, method, topk_fraction)
        encoded.update({key + suffix: part for suffix, part in parts.items()})
        new_residual[key] = delta - decoded
    return encoded, new_residual


def _encode_tensor(delta: torch.Tensor, method: str, topk_fraction: float
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({suffix: part}, the delta as the server will decode it) for one float32 delta."""
    if method == "fp16":
        half = delta.half()
        return {"": half}, half.float()
    if method == "int8":
        peak = float(delta.abs().max()) if delta.numel() else 0.0
        scale = peak / 127 if peak > 0 else 1.0
        q = (delta / scale).round().clamp(-127, 127).to(torch.int8)
        return {"": q, SEP + "scale": torch.tensor([scale], dtype=torch.float32)}, q.float() * scale
    flat = delta.flatten()
    k = min(flat.numel(), max(1, math.ceil(topk_fraction * flat.numel())))
    index = flat.abs().topk(k, sorted=False).indices.sort().values
    values = flat[index]
    decoded = torch.zeros_like(flat)
    decoded[index] = values
    return {SEP + "index": index.to(torch.int32), SEP + "value": values}, decoded.view_as(delta)


def decode_update(encoded: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor],
                  method: str) -> dict[str, torch.Tensor]:
    """The client's model, sent + decoded delta, in the dtypes of `sent`. Raises ValueError naming
    the array and what was expected when `encoded` does not match `method` and the sent model
    (missing or extra keys, wrong dtype or shape, an index out of range, NaN or Inf)."""
    if method not in COMPRESSIONS:
        raise ValueError(f"unknown update compression {method!r}; known: {', '.join(COMPRESSIONS)}")
    if method == "none":
        return dict(encoded)
    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for key, value in sent.items():
        if not value.is_floating_point():
            expected[key] = (value.dtype, tuple(value.shape))
        elif method == "fp16":
            expected[key] = (torch.float16, tuple(value.shape))
        elif method == "int8":
            expected[key] = (torch.int8, tuple(value.shape))
            expected[key + SEP + "scale"] = (torch.float32, (1,))
        else:  # topk: lengths are checked below
            expected[key + SEP + "index"] = (torch.int32, ())
            expected[key + SEP + "value"] = (torch.float32, ())
    missing, extra = sorted(set(expected) - set(encoded)), sorted(set(encoded) - set(expected))
    if missing or extra:
        raise ValueError(f"{method} update: arrays missing {missing}, unexpected {extra}")
    for key, (dtype, shape) in expected.items():
        array = encoded[key]
        if array.dtype != dtype:
            raise ValueError(f"{method} update: array '{key}' has dtype {array.dtype}, expected {dtype}")
        if shape and tuple(array.shape) != shape:
            raise ValueError(f"{method} update: array '{key}' has shape {tuple(array.shape)}, "
                             f"expected {shape}")
        if array.is_floating_point() and not torch.isfinite(array).all():
            raise ValueError(f"{method} update: array '{key}' holds NaN or Inf values")
    model = {}
    for key, value in sent.items():
        if not value.is_floating_point():
            model[key] = encoded[key]
            continue
        base = value.detach().cpu().float()
        if method == "fp16":
            delta = encoded[key].float()
        elif method == "int8":
            delta = encoded[key].float() * encoded[key + SEP + "scale"][0]
        else:
            delta = _topk_delta(key, encoded[key + SEP + "index"], encoded[key + SEP + "value"], base)
        model[key] = (base + delta).to(value.dtype)
    return model


def _topk_delta(key: str, index: torch.Tensor, values: torch.Tensor, base: torch.Tensor
                ) -> torch.Tensor:
    if index.dim() != 1 or values.shape != index.shape:
        raise ValueError(f"topk update: '{key}{SEP}index' and '{key}{SEP}value' must be 1-D of one "
                         f"length, got shapes {tuple(index.shape)} and {tuple(values.shape)}")
    if index.numel() > base.numel():
        raise ValueError(f"topk update: '{key}' sends {index.numel()} entries, more than its "
                         f"{base.numel()} weights")
    index = index.long()
    if index.numel() and (index.min() < 0 or index.max() >= base.numel()):
        raise ValueError(f"topk update: '{key}{SEP}index' holds indices outside [0, {base.numel()})")
    if index.unique().numel() != index.numel():
        raise ValueError(f"topk update: '{key}{SEP}index' repeats an index")
    delta = torch.zeros(base.numel())
    delta[index] = values
    return delta.view_as(base)
