"""Measured step costs (StepCosts) kept per machine, model and quantization.

`mlx-mtp tune` measures V(m) and D once; later runs warm-start their
DraftPolicy from here so they decide well from the first cycle.  The store
is one JSON file in the user cache directory:

    $XDG_CACHE_HOME/mlx-mtp/calibration.json   (when XDG_CACHE_HOME is set)
    else the platform cache dir via platformdirs (~/.cache/mlx-mtp on Linux,
    ~/Library/Caches/mlx-mtp on macOS), else ~/.cache/mlx-mtp.

It is only a cache: a missing, corrupt or unreadable file reads as empty
and never fails a generation; writes go to a temp file renamed over the
old one, so a crash or a concurrent reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .draft_policy import StepCosts

__all__ = [
    "cache_dir",
    "calibration_path",
    "calibration_key",
    "machine_id",
    "save_costs",
    "load_costs",
]

_FORMAT_VERSION = 1
_FILENAME = "calibration.json"
_SEP = "|"

PathLike = Union[str, "os.PathLike[str]"]


def cache_dir() -> Path:
    """The mlx-mtp user cache directory (not created)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "mlx-mtp"
    try:  # a dependency of textual, so normally present; not required
        import platformdirs

        return Path(platformdirs.user_cache_dir("mlx-mtp", appauthor=False))
    except Exception:
        return Path.home() / ".cache" / "mlx-mtp"


def calibration_path() -> Path:
    """Where the calibration store lives by default."""
    return cache_dir() / _FILENAME


def _clean(part: str) -> str:
    # Keys are joined with '|': keep the parts from containing it.
    return " ".join(str(part).replace(_SEP, "/").split())


def calibration_key(machine: str, model_id: str, quantization: str) -> str:
    """The store key for one (machine, model, quantization)."""
    return _SEP.join(_clean(p) for p in (machine, model_id, quantization))


def _cpu_brand() -> str:
    # platform.processor() is '' on many Linux builds and just 'arm' on
    # Apple silicon, which would merge an M1 and an M4: ask the OS.
    system = platform.system()
    try:
        if system == "Darwin":
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=2)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        elif system == "Linux":
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.lower().startswith(("model name", "hardware")):
                        return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or platform.machine()


def _mlx_device() -> str:
    try:
        import mlx.core as mx  # lazily: this module must import without MLX

        dtype = mx.default_device().type
        return getattr(dtype, "name", str(dtype))
    except Exception:
        return "unknown"


def machine_id() -> str:
    """A readable id of this machine as far as speed is concerned."""
    parts = [
        f"{platform.system()}-{platform.machine()}",
        _cpu_brand(),
        f"cpus={os.cpu_count() or 0}",
        f"mlx={_mlx_device()}",
    ]
    return " / ".join(_clean(p) for p in parts)


def _read_entries(path: Path) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except Exception:  # missing, unreadable, not JSON: an empty store
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def save_costs(key: str, costs: StepCosts, path: Optional[PathLike] = None) -> Path:
    """Store `costs` under `key` (other keys kept); returns the file path.

    Atomic: written to a temp file in the same directory, then renamed.
    """
    target = Path(path) if path is not None else calibration_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    entries = _read_entries(target)
    entry = costs.to_dict()
    entry["saved_at"] = time.time()
    entries[key] = entry
    payload = {"version": _FORMAT_VERSION, "entries": entries}
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                               dir=str(target.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def load_costs(key: str, path: Optional[PathLike] = None) -> Optional[StepCosts]:
    """The costs stored under `key`, or None (absent, corrupt, unreadable)."""
    target = Path(path) if path is not None else calibration_path()
    entry = _read_entries(target).get(key)
    if entry is None:
        return None
    try:
        return StepCosts.from_dict(entry)
    except Exception:
        return None
