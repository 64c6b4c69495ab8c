"""Devices: which accelerators torch sees here, and which one a run trains (or scores) on."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from personanet.errors import ConfigError

if TYPE_CHECKING:
    import torch


def available_devices() -> list[str]:
    """Devices torch can use here, in the order `auto` prefers them last to first."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Under a launcher that starts one process per GPU (torchrun sets ``LOCAL_RANK``),
    ``cuda`` (named, or chosen by ``auto``) means this process's own GPU,
    ``cuda:LOCAL_RANK``, so that the processes do not all share the first one.

    Raises:
        ConfigError: (exit 78) the device is unknown or absent; the message lists the
            devices that exist.
    """
    import torch

    requested = (name or "auto").strip().lower()
    found = available_devices()
    if requested == "auto":
        if "cuda" in found:
            requested = "cuda"
        elif "mps" in found:
            return torch.device("mps")
        else:
            return torch.device("cpu")
    valid = requested in ("cpu", "cuda", "mps") or (
        requested.startswith("cuda:") and requested[5:].isdigit())
    if not valid:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps "
                          f"(available here: {', '.join(found)})")
    if requested == "cuda" and "cuda" in found:
        requested = _local_cuda(found)
    if requested not in found:
        raise ConfigError(f"device {name!r} is not available on this machine; available: "
                          f"{', '.join(found)} (or use --device auto)")
    return torch.device(requested)


def _local_cuda(found: list[str]) -> str:
    """``cuda``, or ``cuda:LOCAL_RANK`` in a process a launcher gave a rank."""
    rank = os.environ.get("LOCAL_RANK", "").strip()
    if not rank:
        return "cuda"
    if not rank.isdigit():
        raise ConfigError(f"LOCAL_RANK = {rank!r} is not a GPU number")
    if f"cuda:{rank}" not in found:
        raise ConfigError(f"LOCAL_RANK = {rank} names no GPU here; available: "
                          f"{', '.join(found)}")
    return f"cuda:{rank}"
