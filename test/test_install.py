"""The installed package as ros2launch sees it: real files in the share directory, found through ament_index.

`ros2 launch PKG FILE` walks the package's share directory without following symlinks, so a
share tree of links (as an earlier set-up made) hides the launch file from it.
"""
from __future__ import annotations

import os
from pathlib import Path

from ament_index_python.packages import get_package_share_directory

ROOT = Path(__file__).resolve().parents[1]
SHARED_FILES = ("launch/grounding.launch.py", "config/grounding.yaml", "config/grounding.rviz", "package.xml")


def _walk_without_links(top: str) -> dict:
    """relative path -> absolute path of every regular file reachable without following a link."""
    found = {}
    for dirpath, _dirs, files in os.walk(top, followlinks=False):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                found[os.path.relpath(path, top)] = path
    return found


def test_share_directory_holds_real_files_a_launch_walk_finds() -> None:
    share = get_package_share_directory("kosmos2_ros")
    found = _walk_without_links(share)
    for rel in SHARED_FILES:
        assert rel in found, f"{rel} not found by a walk of {share} that does not follow links (rerun scripts/setup.sh)"
        installed = Path(found[rel]).read_bytes()
        assert installed == (ROOT / rel).read_bytes(), f"installed {rel} is stale: rerun scripts/setup.sh"
