"""Generate tables of the docs from the code, so they cannot drift: docs/node.md's parameter and
launch-argument tables, docs/backends.md's table of what int8 / int4 quantize and why.

    scripts/ros-env python scripts/gen_docs.py            # rewrite the generated blocks
    scripts/ros-env python scripts/gen_docs.py --check    # exit 1 when a doc differs (test_docs.py)

Parameters come from the one config (`core/config.Kosmos2Config`: names, types, defaults), its
ranges (`config.RANGES`) and the node's descriptions (`ros/parameters.PARAMETER_DOCS`, which
`ros2 param describe` shows); launch arguments from `launch/grounding.launch.py` itself (its
DeclareLaunchArgument calls, read as source: launch need not be installed).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "node.md"
BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (\w+) .*?-->\n)(.*?)(<!-- END GENERATED: \2 -->)", re.S)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return "[" + ", ".join(map(str, v)) + "]"
    if v == "":
        return '""'
    return str(v)


def parameters_table() -> str:
    from kosmos2_ros.core.serving.config import RANGES, Kosmos2Config
    from kosmos2_ros.ros.parameters import DEFERRED_PARAMETERS, PARAMETER_DOCS

    rows = ["| Name | Type | Default | Range | Meaning |", "|---|---|---|---|---|"]
    defaults = Kosmos2Config()
    for f in dataclasses.fields(Kosmos2Config):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        kind = "string[]" if "Tuple" in kind else kind
        low_high = RANGES.get(f.name)
        rng = f"{low_high[0]:g} .. {low_high[1]:g}" if low_high else ""
        doc = PARAMETER_DOCS.get(f.name, "").replace("|", "\\|")
        if f.name in DEFERRED_PARAMETERS:
            doc += " (next configure)"
        default = f.default if f.default is not dataclasses.MISSING else getattr(defaults, f.name)   # as declared
        rows.append(f"| {f.name} | {kind} | {_value(default)} | {rng} | {doc} |")
    return "\n".join(rows) + "\n"


def launch_arguments() -> List[Tuple[str, str, str]]:
    """(name, default, description) of every DeclareLaunchArgument in the launch file, in order."""
    tree = ast.parse((ROOT / "launch" / "grounding.launch.py").read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DeclareLaunchArgument":
            kw: Dict[str, str] = {}
            for k in node.keywords:
                try:
                    kw[k.arg] = ast.literal_eval(k.value)
                except ValueError:   # os.path.join(share, 'config', 'x') -> <package share>/config/x
                    text = ast.unparse(k.value)
                    parts = re.findall(r"'([^']*)'", text)
                    kw[k.arg] = "<package share>/" + "/".join(parts) if text.startswith("os.path.join(share") else text
            out.append((ast.literal_eval(node.args[0]), str(kw.get("default_value", "")), str(kw.get("description", ""))))
    return out


def launch_table() -> str:
    rows = ["| Argument | Default | Meaning |", "|---|---|---|"]
    for name, default, doc in launch_arguments():
        rows.append(f"| {name} | {('`' + default + '`') if default else '(empty)'} | {doc.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


def quantized_table() -> str:
    """core/backends/onnx/quantize.QUANTIZED_CHOICES: what int8 / int4 do to which products, and why."""
    from kosmos2_ros.core.backends.onnx.quantize import QUANTIZED_CHOICES

    rows = ["| what | int8 / int4 | why (measured) |", "|---|---|---|"]
    rows += [f"| {what} | {how} | {why} |" for what, how, why in QUANTIZED_CHOICES]
    return "\n".join(rows) + "\n"


GENERATORS = {"parameters": parameters_table, "launch_arguments": launch_table, "quantized": quantized_table}
#: Which generated blocks each doc holds.
DOCS = {DOC: {"parameters", "launch_arguments"}, ROOT / "docs" / "backends.md": {"quantized"}}


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + GENERATORS[m.group(2)]() + m.group(4), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="exit 1 when a doc differs from the code")
    args = ap.parse_args(argv)
    for doc, blocks in DOCS.items():
        name = doc.relative_to(ROOT)
        text = doc.read_text()
        found = {m.group(2) for m in BLOCK.finditer(text)}
        if found != blocks:
            print(f"{name} must hold the generated blocks {sorted(blocks)}, has {sorted(found)}", file=sys.stderr)
            return 1
        new = render(text)
        if args.check:
            if new != text:
                print(f"{name} is out of date with the code: run scripts/ros-env python scripts/gen_docs.py",
                      file=sys.stderr)
                return 1
        else:
            doc.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
