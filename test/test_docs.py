"""The docs against the code: generated tables current, message fields named as the .msg files have
them, links that resolve, a README a ROS user reads in five minutes, and its commands run as written."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def msg_fields(name: str) -> Set[str]:
    fields = set()
    for line in (ROOT / "msg" / f"{name}.msg").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and "=" not in line:
            fields.add(line.split()[1])
    return fields


def message_bullets() -> Dict[str, str]:
    """{message name: its bullet's text} of docs/node.md's Messages section."""
    text = (DOCS / "node.md").read_text()
    section = text[text.index("## Messages"):text.index("## Parameters")]
    return {m.group(1): m.group(2) for m in re.finditer(r"^- \*\*(\w+)\*\*[^:]*:(.*?)(?=^- \*\*|\Z)", section, re.S | re.M)
            if (ROOT / "msg" / f"{m.group(1)}.msg").is_file()}


@pytest.mark.ros   # the parameter tables come from the node's ROS parameter descriptors
def test_generated_tables_match_the_code():
    """docs/node.md's parameter and launch-argument tables are what scripts/gen_docs.py makes from the
    config, the node's parameter descriptions and the launch file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    gen_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_docs)
    assert gen_docs.main(["--check"]) == 0, "run: scripts/ros-env python scripts/gen_docs.py"
    table = gen_docs.parameters_table()
    from kosmos2_ros.core.serving.config import Kosmos2Config

    assert all(f"| {name} |" in table for name in Kosmos2Config.__dataclass_fields__)


def test_message_fields_in_the_docs_are_the_messages_fields():
    bullets = message_bullets()
    assert set(bullets) == {"GroundingCommand", "GroundingResult", "GroundedObject", "Tracks", "TrackedQuery", "TrackedCheck",
                            "ObjectCloud"}
    from kosmos2_ros.core.serving.config import Kosmos2Config

    parameters = set(Kosmos2Config.__dataclass_fields__)
    for name, text in bullets.items():
        named = {m.rstrip("[]") for m in re.findall(r"`([a-z][a-z0-9_]*(?:\[\])?)`", text)}
        fields = msg_fields(name)
        assert fields <= named, f"{name}: fields not in docs/node.md: {sorted(fields - named)}"
        unknown = {n for n in named if "_" in n and n not in fields and n not in parameters}
        assert not unknown, f"{name}: docs/node.md names {sorted(unknown)}, which {name}.msg does not have"


def test_links_resolve_and_the_readme_is_short():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith("http"):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    for page in sorted(DOCS.glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"the README's table does not link {page.name}"


@pytest.mark.ros   # through scripts/ros-env, as the README writes it
@pytest.mark.timeout(600)
def test_quick_start_demo_runs_as_written(tmp_path):
    """The README's `scripts/ros-env kosmos2-demo` (after the set-up CI runs), from another directory:
    offline it says so and runs on the tiny checkpoint, writing out/demo/ there."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([str(ROOT / "scripts" / "ros-env"), "kosmos2-demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out" / "demo" / "results.json").is_file()
    assert "tiny" in (done.stdout + done.stderr).lower()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
