"""The test harness's DDS domain ids: concurrent test runs on one machine never share one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from node_helpers import free_domain


def test_free_domain_is_exclusive_across_processes() -> None:
    mine = {free_domain(), free_domain()}
    assert len(mine) == 2
    here = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {here!r}); from node_helpers import free_domain; print(free_domain())"
    other = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert other not in mine
