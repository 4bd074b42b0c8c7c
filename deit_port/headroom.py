"""Memory checked before the work, like the disk: what a conversion or an ONNX export will need
on top of what the process holds, against what the process may still use.

What may be used is the least of: the kernel's `MemAvailable`, the cgroup's limit less its
usage (v2 `memory.max`/`memory.current`, v1 `memory.limit_in_bytes`/`memory.usage_in_bytes`),
and the address-space limit (`RLIMIT_AS`) less the process's `VmSize`. What is needed is an
estimate from the model's parameters (docs/family.md says how it was measured against the
giants): a verified conversion holds the timm model and, while it checks the written folder,
the transformers model; `--no-verify` the timm model and the shard being written; a cast adds
the cast copy; an ONNX export the torch model, the ONNX graph and the onnxruntime session.

    >>> check_memory(estimate_convert(model, verify=True), "a verified conversion")
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

from torch import nn

from .errors import MemoryShortError

__all__ = [
    "available_memory",
    "check_convert",
    "check_export",
    "check_memory",
    "estimate_convert",
    "estimate_export",
    "memory_error",
]

GIB = 1024**3
# What a step holds besides the weights (the parity batch, allocator slack): the giants' peak
# RSS above their weights and the process's RSS at the check (docs/family.md).
_SLACK = GIB // 4
_ALLOCATOR_ERROR = "can't allocate memory"


def available_memory() -> tuple[int, str]:
    """`(bytes, what binds)`: the least of MemAvailable, the cgroup limit less usage and
    RLIMIT_AS less the process's VmSize; `what` names the one that binds."""
    found: dict[str, int] = {}
    meminfo = _meminfo("MemAvailable")
    if meminfo is not None:
        found["MemAvailable"] = meminfo
    cgroup = _cgroup_room()
    if cgroup is not None:
        found["the cgroup's memory limit"] = cgroup
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found["the address-space limit (ulimit -v)"] = max(0, soft - _status("VmSize"))
    if not found:
        return 2**62, "nothing"
    what = min(found, key=lambda k: found[k])
    return found[what], what


def estimate_convert(model: nn.Module, *, verify: bool = True, dtype: str = "float32") -> int:
    """Bytes a conversion of `model` (built on the meta device) needs on top of the process.

    The timm model in float32 (the written folder is loaded back, mapped, after it is freed);
    verified, an eighth more and the activations of the parity batch. A cast (`float16`,
    `bfloat16`) adds the cast copy. Measured against the giants' peak RSS (docs/family.md)."""
    weights = _weights(model)
    written = weights if dtype == "float32" else weights // 2
    need = weights + (weights // 8 + _activations(model) if verify else 0)
    if written != weights:
        need += written
    return need + _SLACK


def estimate_export(weights: int) -> int:
    """Bytes an ONNX export of a model with `weights` float32 bytes needs: the transformers
    model, the exported graph's tensors, the onnxruntime session checking it."""
    return 3 * weights + _SLACK


def check_memory(need: int, what: str, *, instead: tuple[str, int] | None = None) -> None:
    """Refuse, before any work, a step that needs more memory than the process may use.

    Args:
        need: bytes needed (`estimate_convert`, `estimate_export`).
        what: the step, e.g. "a verified conversion".
        instead: `(option, bytes)` of a cheaper way to say, e.g. `("--no-verify", n)`.

    Raises:
        MemoryShortError: "needs about 15.1 GiB of memory for a verified conversion, 9.8 GiB
            available (MemAvailable); --no-verify needs about 7.6 GiB".
    """
    have, binding = available_memory()
    if need <= have:
        return
    line = f"needs about {need / GIB:.1f} GiB of memory for {what}, {have / GIB:.1f} GiB available ({binding})"
    if instead is not None:
        option, less = instead
        line += f"; {option} needs about {less / GIB:.1f} GiB"
    else:
        line += "; free memory or raise the limit"
    raise MemoryShortError(line)


def check_convert(
    name: str, model_kwargs: dict | None, *, verify: bool, dtype: str = "float32"
) -> None:
    """`check_memory` for converting the timm model `name` (built on the meta device), before
    its weights are loaded; a verified conversion that does not fit names `--no-verify`'s need.

    Raises:
        UnsupportedModelError: the model cannot be converted (`ArchSpec.from_timm`), first.
        MemoryShortError: it does not fit.
    """
    from .arch import ArchSpec
    from .registry import build_on_meta, resolve_model_name

    model = build_on_meta(resolve_model_name(name).split(".", 1)[0], **(model_kwargs or {}))
    ArchSpec.from_timm(model)  # a model that cannot be converted is refused for that first
    need = estimate_convert(model, verify=verify, dtype=dtype)
    if verify:
        less = estimate_convert(model, verify=False, dtype=dtype)
        check_memory(need, "a verified conversion", instead=("--no-verify", less))
    else:
        check_memory(need, "a conversion")


def check_export(folder: str | os.PathLike, *, with_timm: bool = False) -> None:
    """`check_memory` for an ONNX export of the transformers folder `folder` (its weights'
    size from its safetensors files, in float32), with the timm model beside it where the
    export is compared with timm (`with_timm`)."""
    folder = Path(folder)
    stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    half = (config.get("dtype") or config.get("torch_dtype")) in ("float16", "bfloat16")
    weights = stored * (2 if half else 1)
    check_memory(estimate_export(weights) + (weights if with_timm else 0), "an ONNX export")


def memory_error(e: BaseException) -> MemoryShortError | None:
    """The one-line error of an allocation that failed anyway (`MemoryError`, torch's
    `DefaultCPUAllocator: can't allocate memory`), else None."""
    if isinstance(e, MemoryShortError):
        return e
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _ALLOCATOR_ERROR in str(e)):
        have, binding = available_memory()
        return MemoryShortError(
            f"ran out of memory ({have / GIB:.1f} GiB available, {binding}); free memory, "
            "raise the limit or try --no-verify; nothing was written"
        )
    return None


def _weights(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers in float32."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() for t in tensors) * 4


def _activations(model: nn.Module, batch: int = 4) -> int:
    """The largest activations of a forward pass of the parity batch: the MLP's hidden
    states and one block's attention matrix, with their neighbours."""
    embed = getattr(model, "embed_dim", 0)
    blocks = list(getattr(model, "blocks", []))
    pe = getattr(model, "patch_embed", None)
    if not blocks or pe is None:
        return 0
    tokens = int(getattr(pe, "num_patches", 0)) + 2
    hidden = getattr(getattr(blocks[0], "mlp", None), "fc1", None)
    width = max(3 * embed, getattr(hidden, "out_features", 0))
    heads = getattr(getattr(blocks[0], "attn", None), "num_heads", 1)
    return 4 * batch * tokens * (2 * width + 2 * heads * tokens)


def _meminfo(key: str) -> int | None:
    return _proc_bytes("/proc/meminfo", key)


def _status(key: str) -> int:
    return _proc_bytes("/proc/self/status", key) or 0


def _proc_bytes(path: str, key: str) -> int | None:
    """`key`'s figure in a /proc file of `key:  N kB` lines, in bytes; None where absent."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    """The cgroup's limit less its usage (v2, else v1), or None where there is no limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit, usage = base / "memory.max", base / "memory.current"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit, usage = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        else:
            continue
        room = _room(limit, usage)
        if room is not None:
            return room
    return None


def _room(limit: Path, usage: Path) -> int | None:
    try:
        text = limit.read_text().strip()
        used = int(usage.read_text().strip())
    except (OSError, ValueError):
        return None
    if text == "max" or int(text) >= 2**60:
        return None
    return max(0, int(text) - used)
