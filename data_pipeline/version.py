"""What code made an artifact: the installed package version and the git commit, if any."""

from __future__ import annotations

import os
import subprocess
from importlib.metadata import PackageNotFoundError, version


def code_version() -> dict[str, str]:
    try:
        package = version("pixelbert-dist")
    except PackageNotFoundError:
        package = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"  # e.g. a `ray job submit` working dir has no .git
    return {"package": package, "git_commit": commit}
