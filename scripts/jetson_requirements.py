"""scripts/requirements-jetson.txt, checked from a desktop: what pip resolves it to on a Jetson, and its floors.

    python3.10 scripts/jetson_requirements.py check     # resolve for JetPack 6 (Python 3.10, aarch64), no install
    python3.10 scripts/jetson_requirements.py oldest    # the file's floors as pins (the Python 3.10 CI job's set)

`check` runs `pip install --dry-run --report` for Python 3.10 on manylinux aarch64 (glibc 2.35, Ubuntu 22.04)
with binary wheels only, prints what it would install, and fails with one line for anything that would break
JetPack: a torch, TensorRT, CUDA or OpenCV wheel (JetPack's stay), numpy 2 (Humble's cv_bridge and other
compiled ROS packages are built on numpy 1.21), or a transformers that disables JetPack's torch 2.5.0a0.
Runs under Python 3.10 (JetPack's), with no package of this project imported.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
JETSON_FILE = ROOT / "scripts" / "requirements-jetson.txt"
#: JetPack 6 is Ubuntu 22.04 (glibc 2.35); pip takes a manylinux tag only as written, so list every older one too.
PLATFORMS = [f"manylinux_2_{minor}_aarch64" for minor in range(35, 16, -1)] + ["manylinux2014_aarch64"]
#: Wheels that would replace what JetPack ships (its CUDA torch, TensorRT 10.3, CUDA 12.6, OpenCV 4.8).
JETPACK_OWNS = re.compile(r"^(torch|torchvision|tensorrt.*|nvidia-.*|opencv-.*|onnxruntime.*)$")
#: The first transformers release that disables torch 2.5.0a0 (JetPack 6.1/6.2's, below 2.5 under PEP 440).
TRANSFORMERS_TOO_NEW = (5, 15)


def version_tuple(version: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def resolve(pip: List[str]) -> Dict[str, str]:
    """name -> version that pip would install for JetPack 6, from an empty target."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [*pip, "install", "--dry-run", "--quiet", "--disable-pip-version-check", "--ignore-installed",
               "--report", str(report), "--target", str(Path(tmp) / "target"), "--python-version", "3.10",
               "--only-binary=:all:", "-r", str(JETSON_FILE)]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING: Location")]
            sys.exit("requirements-jetson.txt does not resolve for Python 3.10 / aarch64: " + " ".join(errors[-3:]))
        data = json.loads(report.read_text())
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in data["install"]}


def problems(resolved: Dict[str, str]) -> List[str]:
    out = [f"{name} {version} would replace JetPack's" for name, version in resolved.items() if JETPACK_OWNS.match(name)]
    numpy = resolved.get("numpy")
    if numpy is None or version_tuple(numpy) >= (2,):
        out.append(f"numpy {numpy} (Humble's compiled packages need numpy 1.x)")
    transformers = resolved.get("transformers")
    if transformers is None or version_tuple(transformers)[:2] >= TRANSFORMERS_TOO_NEW:
        out.append(f"transformers {transformers} disables JetPack's torch 2.5.0a0")
    return out


def oldest() -> List[str]:
    """Each `name>=X` line of the Jetson file as `name==X`; lines without a floor as they are."""
    pins = []
    for line in JETSON_FILE.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if not spec:
            continue
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", spec)
        assert match is not None, spec
        floor = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", match.group(2))
        pins.append(f"{match.group(1)}=={floor.group(1)}" if floor else spec)
    return pins


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("check", "oldest"))
    args = ap.parse_args(argv)
    if args.what == "oldest":
        print("\n".join(oldest()))
        return 0
    resolved = resolve([sys.executable, "-m", "pip"])
    print("requirements-jetson.txt for Python 3.10 / aarch64 (JetPack 6) resolves to:")
    print(" ".join(f"{name}=={version}" for name, version in sorted(resolved.items())))
    found = problems(resolved)
    if found:
        print("requirements-jetson.txt would break JetPack: " + "; ".join(found), file=sys.stderr)
        return 1
    print("no torch, TensorRT, CUDA or OpenCV wheel; numpy < 2; transformers accepts JetPack's torch")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
