"""Open an inspection page in a real headless browser (Debian's `chromium`): its DOM as the
browser built it, and a screenshot. Used by the page test and the study script."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from diffmas.errors import DiffmasError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


def _run(html_path: Path, *flags: str, timeout: int = 120) -> subprocess.CompletedProcess:
    browser = find_chromium()
    if browser is None:
        raise DiffmasError("no chromium found; install it (Debian: apt-get install -y chromium)")
    # --no-sandbox: CI runs as root, where chromium refuses its own sandbox; the page is our own file
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *flags]
    proc = subprocess.run([*cmd, Path(html_path).resolve().as_uri()], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise DiffmasError(f"chromium failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return proc


def dump_dom(html_path: str | Path) -> str:
    """The page's DOM after the browser parsed and laid it out, serialised."""
    return _run(Path(html_path), "--dump-dom").stdout


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1300, height: int = 1500) -> Path:
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    _run(Path(html_path), f"--screenshot={png_path}", f"--window-size={width},{height}")
    if not png_path.is_file() or png_path.stat().st_size == 0:
        raise DiffmasError(f"chromium wrote no screenshot at {png_path}")
    return png_path
