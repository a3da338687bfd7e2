"""Atomic file writes: a reader (or a crash, or Ctrl-C) sees the old file or the new one, never half.

Write to a temporary file in the same folder (same filesystem, so the rename is atomic),
flush it to disk, then os.replace() it over the target.

torch and safetensors (which imports torch) are imported by the two functions that write with
them: `python -m minti train --help` reads minti.demo.demo, which imports this module, and
starts in a fraction of a second without torch (2.5 s and more with it on 2 cores).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import resource
except ImportError:  # Windows has no resource module
    resource = None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # the writer may not have fsynced; make the bytes durable
            os.fsync(f.fileno())
        # mkstemp made it 0600 (and a writer may recreate it): give it the mode open() would
        # (the old file's, or 0666 minus the umask): another user's A1111/ComfyUI must read it
        os.chmod(tmp_path, _mode_for(path))
        os.replace(tmp_path, path)
    except BaseException as e:  # also KeyboardInterrupt: never leave a stray temporary behind
        tmp_path.unlink(missing_ok=True)
        if not isinstance(e, OSError) and _is_write_failure(e):
            raise WriteError(path, _why_writing_failed(path, e)) from e
        raise
    _fsync_dir(path.parent)


class WriteError(OSError):
    """A write that failed for lack of room (a full disk, a file-size limit) or another I/O error,
    raised by a library in its own words (torch.save: "unexpected pos ...", "basic_ios::clear";
    safetensors: "I/O error"). `reason` says it in a user's."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = path, reason


# What torch.save (its C++ zip writer) and safetensors (Rust) say when the bytes did not reach the file.
_WRITE_FAILURE_MARKERS = ("inline_container", "basic_ios", "file write failed", "PytorchStreamWriter",
                          "I/O error", "os error", "No space left", "File too large")


def _is_write_failure(e: BaseException) -> bool:
    return isinstance(e, Exception) and any(m in str(e) for m in _WRITE_FAILURE_MARKERS)


def _why_writing_failed(path: Path, e: BaseException) -> str:
    """The likely cause, since torch's message does not say: a full disk, a file-size limit, or
    the library's first line."""
    text = str(e)
    try:
        stat = os.statvfs(path.parent)
        if stat.f_bavail * stat.f_frsize < 64 * 2**20 or "No space left" in text or "os error 28" in text:
            return "the disk is full (No space left on device)"
    except (OSError, AttributeError):  # statvfs: POSIX only
        pass
    if resource is not None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY or "File too large" in text or "os error 27" in text:
            return "the file-size limit was reached (File too large; see ulimit -f)"
    return "the write failed (" + " ".join(text.split())[:200] + ")"


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)  # the only way to read it; set straight back
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; not possible (nor needed) on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into `folder` (created if missing), in a few words ("is a file",
    "cannot be written (Read-only file system ...)"), or None. Probes with a temporary file in the
    folder or its nearest existing parent: permissions alone miss read-only mounts and root."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return "is a file: pass a folder"
    existing = next(p for p in [folder, *folder.parents] if p.exists() or p == p.parent)
    if not existing.is_dir():
        return f"cannot be made: {existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"cannot be written ({e.strerror or e} in {existing}): pick a folder you can write to"
    return None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file  # here, not at the top: see the module docstring

    # safetensors refuses views of shared storage; contiguous copies are tiny here.
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def torch_save(obj, path: str | os.PathLike) -> None:
    import torch  # here, not at the top: see the module docstring

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_png(image, path: str | os.PathLike) -> None:
    """Save a PIL image as PNG (the temporary name has no .png suffix, so name the format)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
