"""A TDLRT Trainer run that kills itself (SIGKILL) in the middle of writing a checkpoint.

    python tests/scripts/killed_run.py OUT_DIR --kill-step 8 --kill-file optimizer.pt

Trains ``tiny_trainer.build_trainer`` with a checkpoint every 4 steps. While the Trainer writes ``--kill-file``
of ``checkpoint-<kill-step>``, half of the file's bytes reach the disk and then the process receives SIGKILL: no
exception handler, ``finally`` or atexit runs, exactly as with an out-of-memory kill or a pre-empted node.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # repo root, for `tests.scripts`

import torch  # noqa: E402

from tests.scripts.tiny_trainer import build_trainer  # noqa: E402


def kill_while_writing(folder_name: str, file_name: str) -> None:
    """Replace ``torch.save`` so that writing ``<folder_name>/<file_name>`` stops half-way with SIGKILL."""
    original = torch.save

    def save(obj, f, *args, **kwargs):
        path = Path(os.fspath(f)) if isinstance(f, (str, os.PathLike)) else None
        if path is None or path.name != file_name or path.parent.name != folder_name:
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(path, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--kill-step", type=int, default=8)
    parser.add_argument("--kill-file", default="optimizer.pt")
    parser.add_argument("--steps", type=int, default=12)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    kill_while_writing(f"checkpoint-{cli.kill_step}", cli.kill_file)
    build_trainer(cli.out_dir, max_steps=cli.steps, save_strategy="steps", save_steps=4).train()
    sys.exit("the run was not killed")


if __name__ == "__main__":
    main()
