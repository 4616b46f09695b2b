"""Training scripts for the bundled demo checkpoints in `assets/`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional


def open_run_log(out: Path, log: Optional[str], append: bool) -> Callable[[str], None]:
    """A `say(msg)` that prints and appends `[elapsed] msg` to the run's log
    (default: OUT/../<name>-train.log, next to the checkpoint)."""
    start = time.time()
    path = Path(log) if log else out.parent / f"{out.name}-train.log"
    f = open(path, "a" if append else "w", buffering=1)

    def say(msg: str) -> None:
        line = f"[{time.time() - start:7.1f}s] {msg}"
        print(line, flush=True)
        f.write(line + "\n")

    return say
