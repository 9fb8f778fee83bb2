"""Mixed precision, torch.compile and channels-last in one place, for every medfm trainer.

``resolve_precision(name, device)`` checks that a precision can run on a device and returns what a custom
loop needs (an autocast context factory, a GradScaler where fp16 needs one, the autocast dtype); the
Lightning trainers pass the same name to ``L.Trainer(precision=...)`` after the same check. A combination
that cannot run is a one-line ``ConfigError`` before training starts; one that runs slowly (bf16 emulated on a
CPU without native bf16) warns once per process, never per step. ``maybe_compile`` compiles a module in
place (state-dict keys unchanged) and, if compilation fails, says so once and runs eager. ``StepTimer``
measures how much of each training step is spent waiting for data.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfm.errors import ConfigError

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
LIGHTNING_ONLY = ("bf16-true", "64")  # accepted by the Lightning pretrainer (it was before), nowhere else
_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """``warnings.warn`` the first time ``message`` is seen in this process, then stay quiet."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX on x86, the BF16 extension on Arm)."""
    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "BF16" in cap or "AMX" in cap:
        return True
    try:
        text = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    flags = set(text.replace(":", " ").split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def auto_precision(device: str | torch.device | None = "auto") -> str:
    """The fastest precision that trains like fp32 here: "bf16-mixed" on a GPU with bf16 or a CPU with native
    bf16 (2.5x faster MAE steps, loss curves within seed noise: benchmarks/results/precision_curves.md),
    else "32"."""
    dev = device_type(device)
    if dev == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32"
    return "bf16-mixed" if dev == "cpu" and cpu_has_native_bf16() else "32"


def device_type(device: str | torch.device | None) -> str:
    """"cpu", "cuda" or "mps" for a device, a device name, or an accelerator name ("auto", "gpu")."""
    if isinstance(device, torch.device):
        return device.type
    name = str(device or "auto").lower()
    if name in ("auto", "gpu"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name).type
    except (RuntimeError, ValueError):  # an accelerator torch has no device for here (e.g. "tpu")
        return name


@dataclass(frozen=True)
class Precision:
    """A checked precision for one device type: ``autocast()`` around forward passes and losses, and
    ``grad_scaler()`` (fp16 on CUDA only) for the backward pass and optimizer step."""

    name: str
    device_type: str
    dtype: torch.dtype | None  # the autocast dtype; None: full precision

    @property
    def mixed(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context (a no-op context in full precision)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for 16-mixed on CUDA (fp16 gradients underflow without one); None otherwise."""
        if self.name == "16-mixed" and self.device_type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None


def resolve_precision(
    name: str, device: str | torch.device | None = "auto", allowed: Iterable[str] = PRECISIONS
) -> Precision:
    """Check that precision ``name`` can run on ``device`` and return it (see the module docstring)."""
    allowed = tuple(allowed)
    name = str(name)
    if name not in allowed:
        raise ConfigError(f"--precision must be {', '.join(allowed[:-1])} or {allowed[-1]}, got '{name}'")
    kind = device_type(device)
    if name in ("32", "64"):
        return Precision(name, kind, None)
    if name == "16-mixed" and kind == "cpu":
        raise ConfigError("--precision 16-mixed needs a GPU (CPU autocast has no fp16 kernels); "
                          "use bf16-mixed on CPU")
    if "bf16" in name and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision {name}: this GPU has no bf16 support; use 16-mixed")
    if "bf16" in name and kind == "cpu" and not cpu_has_native_bf16():
        warn_once(f"--precision {name}: this CPU has no native bf16 (no AVX512-BF16 / AMX); bf16 is "
                  "emulated and may be slower than 32")
    return Precision(name, kind, _DTYPES.get(name, torch.bfloat16))


def scaled_backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """``loss.backward()``, through the GradScaler when there is one."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    clip_params: Iterable[torch.Tensor] | None = None,
    max_norm: float = 0.0,
) -> None:
    """Optional gradient clipping, then ``opt.step()`` (unscaled and skipped on inf/NaN with a scaler)."""
    if scaler is not None:
        scaler.unscale_(opt)
    if clip_params is not None and max_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(clip_params), max_norm)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def _with_eager_fallback(compiled: Callable[..., Any], eager: Callable[..., Any], name: str,
                         on_fail: Callable[[], None] | None = None) -> Callable[..., Any]:
    """``compiled`` until it raises once (compilation is lazy: it fails at a call), then ``eager`` for good,
    with one warning. An error the eager function raises too is raised."""
    state = {"failed": False}

    def call(*args: Any, **kwargs: Any) -> Any:
        if state["failed"]:
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (any compiler failure: say so and run eager)
            state["failed"] = True
            first = str(e).splitlines()[0][:160] if str(e) else ""
            warn_once(f"torch.compile failed for {name} ({type(e).__name__}: {first}); running eager")
            if on_fail is not None:
                on_fail()
            return eager(*args, **kwargs)

    return call


def maybe_compile(module: nn.Module, enabled: bool, **compile_kw: Any) -> nn.Module:
    """Compile ``module`` in place with torch.compile when ``enabled``; returns the same module.

    Like ``nn.Module.compile`` the parameters and state-dict keys are unchanged (checkpoints, safetensors
    and resume work as in eager mode). Compilation happens at the first call; if it fails there, a warning
    says so once and the module runs eager from then on. ``uncompile`` drops the compiled call again (do it
    before ``copy.deepcopy`` or saving the module whole).
    """
    if not enabled:
        return module
    compiled = torch.compile(module._call_impl, **compile_kw)

    def drop() -> None:
        module._compiled_call_impl = None

    name = type(module).__name__
    module._compiled_call_impl = _with_eager_fallback(compiled, module._call_impl, name, drop)
    return module


def compile_function(fn: Callable[..., Any], enabled: bool, name: str = "", **compile_kw: Any
                     ) -> Callable[..., Any]:
    """``torch.compile(fn)`` with the same say-once eager fallback as ``maybe_compile`` (for a bound method
    such as an objective's ``compute_loss``, whose modules are called through other methods than forward)."""
    if not enabled:
        return fn
    label = name or getattr(fn, "__qualname__", "function")
    return _with_eager_fallback(torch.compile(fn, **compile_kw), fn, label)


def uncompile(module: nn.Module) -> nn.Module:
    """Undo ``maybe_compile`` (eager calls again); returns the module."""
    module._compiled_call_impl = None
    return module


def channels_last(module: nn.Module) -> nn.Module:
    """Channels-last memory format for a CNN (``channels_last`` with Conv2d, ``channels_last_3d`` with
    Conv3d); a model without convolutions (a ViT's patch embedding aside) is returned unchanged."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]
    if not convs or len(convs) == 1:  # no CNN (a ViT has one patch-embedding conv): nothing to gain
        return module
    if any(isinstance(m, nn.Conv3d) for m in convs):
        return module.to(memory_format=torch.channels_last_3d)
    return module.to(memory_format=torch.channels_last)


class StepTimer:
    """Per training step: the time spent waiting for the batch vs the whole step.

    Call ``batch_ready()`` when a batch arrives (before moving it to the device) and ``step_done()`` after
    the optimizer step. The wait of a step runs from the previous ``step_done`` to this ``batch_ready``;
    the first step (start-up, worker spawn) is not counted.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.wait = 0.0
        self.total = 0.0
        self.steps = 0
        self._last_end: float | None = None
        self._ready: float | None = None

    def batch_ready(self) -> None:
        self._ready = self.clock()

    def step_done(self) -> None:
        now = self.clock()
        if self._last_end is not None and self._ready is not None:
            self.wait += max(0.0, self._ready - self._last_end)
            self.total += now - self._last_end
            self.steps += 1
        self._last_end = now
        self._ready = None

    def summary(self) -> dict[str, float | None]:
        """``data_wait_share`` (fraction of step time spent waiting for data, in [0, 1]) and
        ``step_time_ms`` (mean wall time per step); None before two steps have finished."""
        if not self.steps or self.total <= 0:
            return {"data_wait_share": None, "step_time_ms": None}
        return {"data_wait_share": round(min(1.0, self.wait / self.total), 4),
                "step_time_ms": round(1000 * self.total / self.steps, 2)}


def describe_speed(metrics: dict[str, Any]) -> str:
    """One line for the end of training, e.g. "12.5 ms/step, 8% waiting for data"."""
    share, ms = metrics.get("data_wait_share"), metrics.get("step_time_ms")
    if share is None or ms is None:
        return ""
    return f"{ms:.1f} ms/step, {100 * share:.0f}% waiting for data"
