"""Small input-conversion and validation helpers shared by the analysis modules.

Every public analysis function accepts numpy arrays or torch tensors (any device, any float
dtype) so that a model adapter can pass what it captured without copying by hand.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def to_numpy(x: ArrayLike, dtype: np.dtype | type | None = None, name: str = "array") -> np.ndarray:
    """Return ``x`` as a numpy array (on the CPU), optionally cast to ``dtype``.

    Args:
        x: a numpy array, a torch tensor (any device/dtype, gradients are dropped) or anything
            ``np.asarray`` accepts.
        dtype: target numpy dtype, or ``None`` to keep the natural one (torch bfloat16/float16
            become float32, since numpy has no bfloat16).
        name: the argument name, used in error messages.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        arr = t.cpu().numpy()
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover - defensive
            raise ValueError(
                f"{name} could not be converted to an array ({exc}); pass a numpy array or a "
                "torch tensor"
            ) from exc
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr


def to_tensor(
    x: ArrayLike, dtype: torch.dtype = torch.float32, name: str = "array"
) -> torch.Tensor:
    """Return ``x`` as a detached torch tensor of ``dtype``, kept on its device if it is a tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype)
    try:
        return torch.as_tensor(np.asarray(x), dtype=dtype)
    except Exception as exc:
        raise ValueError(
            f"{name} could not be converted to a tensor ({exc}); pass a numpy array or a torch "
            "tensor"
        ) from exc


def check_ndim(arr: np.ndarray | torch.Tensor, ndim: int, name: str, shape_doc: str) -> None:
    """Raise ``ValueError`` unless ``arr`` has exactly ``ndim`` dimensions."""
    if arr.ndim != ndim:
        raise ValueError(
            f"{name} must have shape {shape_doc} ({ndim} dimensions); got shape "
            f"{tuple(arr.shape)}; reshape it (e.g. flatten batch and positions into N = B*T)"
        )


def token_mask(mask: ArrayLike | None, num_tokens: int) -> np.ndarray | None:
    """Validate an optional token mask of shape [N] (True = keep) and return it as bool numpy."""
    if mask is None:
        return None
    m = to_numpy(mask, name="mask")
    if m.ndim != 1 or m.shape[0] != num_tokens:
        raise ValueError(
            f"mask must have shape [N] = [{num_tokens}] (one flag per token); got shape "
            f"{tuple(m.shape)}; flatten an attention mask [B, T] with mask.reshape(-1)"
        )
    m = m.astype(bool)
    if not m.any():
        raise ValueError("mask selects no tokens; pass a mask with at least one True entry")
    return m
