"""What every `python -m minti` command shares: the device and dtype choices, loading the model,
logging to stderr and the training progress line."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import torch

import minti
from minti.errors import UserError, missing_path

DTYPES = ("float16", "bfloat16", "float32")
PREDICTIONS = ("eps", "v")
WEIGHTS = ("dtype", "fp8")  # --weights: "dtype" stores every weight in --dtype (minti.load's weights=None)
WEIGHTS_HELP = ("how the frozen UNet and text-encoder Linear/Conv weights are stored: fp8 keeps them in 8 bits "
                "(a scale per output channel), widened to --dtype one layer at a time; the VAE, norms and "
                "embeddings stay in --dtype (default dtype)")


# --------------------------------------------------------------------------- device and model


def resolve_device(device: str | None) -> str:
    """--device checked against what minti runs on and what this machine has; None: cuda when
    available, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        hint = " (did you mean cuda?)" if device.lower() in ("gpu", "nvidia", "cuda0") else ""
        raise UserError(f"--device {device} is not a device{hint}: use cuda, cuda:N or cpu") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                            f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: no Apple GPU (MPS) is available here; use --device cpu")
    elif parsed.type != "cpu":
        raise UserError(f"--device {device} is not supported: minti runs on cuda (NVIDIA GPUs) or cpu")
    return device


def default_dtype(device: str) -> str:
    """--dtype when it is not given: float16 on cuda, float32 elsewhere."""
    return "float16" if device.startswith("cuda") else "float32"


def stored_weights(weights: str | None) -> str | None:
    """--weights as minti.load's weights=: "dtype" (or nothing given) is None."""
    return None if weights in (None, "dtype") else weights


def load_model(model: str, device: str | None, dtype: str | None, prediction: str | None,
               weights: str | None = None):
    """The checkpoint `model` loaded for --device/--dtype/--prediction/--weights (None: the defaults)."""
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    if not Path(model).exists():
        reason = missing_path(model)
        raise UserError(f"--model {model} {reason}" + (": pass a .safetensors/.ckpt file or a diffusers folder"
                                                       if reason == "does not exist" else ""))
    return minti.load(model, dtype=getattr(torch, dtype), device=device, prediction=prediction,
                      weights=stored_weights(weights))


# --------------------------------------------------------------------------- output


class Progress:
    """One carriage-return line on a terminal; a line every ~5% when stderr is a file/pipe."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.recent: list[float] = []
        self.skipped = 0
        self.open_line = False  # a carriage-return line is on screen without its newline

    def __call__(self, info) -> None:
        if math.isfinite(info.loss):
            self.recent = (self.recent + [info.loss])[-50:]
        self.skipped += info.skipped
        loss = sum(self.recent) / len(self.recent) if self.recent else float("nan")
        line = (f"step {info.step}/{info.total}  loss {loss:.4f}  lr {info.lr:.2e}  "
                f"{info.steps_per_second:.2f} it/s")
        if info.peak_memory is not None:
            line += f"  peak {info.peak_memory / 2**30:.2f} GiB"
        if info.loss_scale is not None:
            line += f"  scale {info.loss_scale:.0f}" + (f" ({self.skipped} skipped)" if self.skipped else "")
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:160])
            self.open_line = True
        else:
            every = max(1, info.total // 20)
            if info.step % every == 0 or info.step >= info.total:
                self.stream.write(line + "\n")
        self.stream.flush()

    def mean_loss(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def close(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


def duration(seconds: float) -> str:
    """12s, 3m04s, 1h02m03s."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (not the one bound when the CLI first ran)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def setup_logging() -> None:
    """minti's log lines on stderr as `minti: LEVEL: message`, once however often a command runs."""
    logger = logging.getLogger("minti")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("minti: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO)
