"""Headless Chromium (Debian's package) for the report's tests: a screenshot and the console."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> str:
    """Chromium's path; without it the test is skipped here and fails in CI (.ci/run installs
    it and sets TAPO_REQUIRE_BROWSER=1)."""
    if CHROMIUM is None:
        message = "no chromium on PATH (Debian: apt-get install chromium)"
        if os.environ.get("TAPO_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


def render(page: Path, png: Path, profile: Path, size=(1280, 2400)) -> list[str]:
    """Loads `page` headless, writes a screenshot to `png` and returns the console lines the
    page logged (errors, uncaught exceptions and console.* calls all appear)."""
    done = subprocess.run(
        [require_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert png.exists(), done.stderr[-2000:]
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def ink(png: Path) -> tuple[float, int]:
    """(share of pixels that are not background white, distinct colours) of a screenshot."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    return float((pixels != 255).any(axis=1).mean()), len(np.unique(pixels, axis=0))
