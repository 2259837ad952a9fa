"""Complete-checkpoint markers (resume only from a checkpoint that was fully written) and adapter-load checks.

transformers' Trainer (checked in 5.24) writes ``checkpoint-N/`` in place, file after file: adapter weights and
config, ``optimizer.pt``, ``scheduler.pt``, the RNG states (one file per process), ``trainer_state.json`` last,
then it deletes the checkpoints past ``save_total_limit``. There is no temporary folder, no fsync and no
completion marker, so a run killed while saving leaves a partial ``checkpoint-N``, and ``get_last_checkpoint``
(``resume_from_checkpoint=True``) picks it as the newest: the resume then fails (missing ``trainer_state.json``,
a truncated file) although the checkpoint before it is intact.

``TDLRTCallback.on_save`` (the Trainer calls it on every process after the checkpoint is written) calls
``mark_complete``: after a barrier, so that every process has written its files, process 0 fsyncs each file and
records its name and size in ``tdlrt_complete.json``, written to a temporary file, fsynced and renamed (a rename
is atomic: the marker is there whole or not at all). Resume with::

    trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

MARKER = "tdlrt_complete.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint folder that was not completely written (or was changed afterwards)."""


def mark_complete(checkpoint_dir: str | os.PathLike, step: int, is_main_process: bool = True,
                  ranks: dict | None = None) -> Path | None:
    """Record that ``checkpoint_dir`` is complete (call on every process after the Trainer saved it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()   # every process has written its own files (RNG states)
    folder = Path(checkpoint_dir)
    if not is_main_process or not folder.is_dir():
        return None
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = path.stat().st_size
    record = {"step": int(step), "files": files, "ranks": ranks or {}}
    temporary = folder / (MARKER + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, folder / MARKER)
    _fsync(folder)
    return folder / MARKER


def verify_checkpoint(checkpoint_dir: str | os.PathLike) -> dict:
    """The marker's record if ``checkpoint_dir`` is complete; else ``IncompleteCheckpointError`` naming what is
    missing or truncated."""
    folder = Path(checkpoint_dir)
    marker = folder / MARKER
    if not marker.is_file():
        raise IncompleteCheckpointError(
            f"{folder} has no {MARKER}: it was not completely written (the run was probably stopped while saving) "
            "or was saved without TDLRTCallback. Resume from `last_complete_checkpoint(output_dir)` instead.")
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise IncompleteCheckpointError(f"{marker} is unreadable ({error}).") from error
    missing = [name for name in record["files"] if not (folder / name).is_file()]
    resized = [f"{name} ({(folder / name).stat().st_size} bytes, {size} written)"
               for name, size in record["files"].items()
               if name not in missing and (folder / name).stat().st_size != size]
    if missing or resized:
        raise IncompleteCheckpointError(
            f"{folder} is incomplete: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else []) +
                ([f"changed size {', '.join(resized)}"] if resized else [])) + ".")
    return record


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that ``verify_checkpoint`` accepts (None if there is none);
    newer, incomplete ones are skipped with a warning that names them."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                         if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))), reverse=True)
    for _, path in candidates:
        try:
            verify_checkpoint(path)
        except IncompleteCheckpointError as error:
            warnings.warn(f"TDLRT: skipping {path.name}: {error}", stacklevel=2)
            continue
        return str(path)
    return None


def _fsync(path: Path) -> None:
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:   # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
