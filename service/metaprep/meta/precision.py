"""Mixed precision in one place: the autocast context for a dtype on a device.

``distributed.precision`` resolves to a dtype (bf16) or to None (fp32); every forward pass that
trains, adapts or evaluates enters :func:`mixed_precision` with that dtype and the device type of
its tensors. With None the context switches autocast *off*, so fp32 is what runs even inside an
enclosing autocast. The device type comes from the tensors, not from a literal, so the same call
is bf16 on a GPU and on a CPU with bf16 matmul instructions.
"""

from __future__ import annotations

import torch


def mixed_precision(device_type: str, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` on ``device_type`` ("cpu", "cuda") in ``dtype``; autocast disabled when ``dtype`` is None."""
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)
