"""Rewrite the build machine's Python paths baked into the ROS wheels' CMake files.

The PyPI ROS 2 wheels export CMake config that names /opt/python/cp311-cp311's include
and numpy directories; the message build needs this interpreter's instead. Idempotent,
and touches nothing outside the given prefix.
"""
import sys
import sysconfig
from pathlib import Path

import numpy

BUILD_PY_INCLUDE = "/opt/python/cp311-cp311/include/python3.11"
BUILD_NUMPY_INCLUDE = "/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include"


def main(prefix: str) -> int:
    replacements = {
        BUILD_NUMPY_INCLUDE: numpy.get_include(),
        BUILD_PY_INCLUDE: sysconfig.get_paths()["include"],
    }
    changed = 0
    for path in Path(prefix, "share").rglob("*.cmake"):
        text = path.read_text(errors="surrogateescape")
        new = text
        for old, repl in replacements.items():
            new = new.replace(old, repl)
        if new != text:
            path.write_text(new, errors="surrogateescape")
            changed += 1
    print(f"fix_wheel_cmake: {changed} file(s) rewritten under {prefix}/share")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
