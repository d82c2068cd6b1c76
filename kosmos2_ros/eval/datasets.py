"""Evaluation samples from the files the paper's evaluation reads. JSON and XML only; nothing is unpickled.

- MDETR-style COCO JSON (`finetune_refcoco_val.json`, `final_flickr_separateGT_test.json`, ...):
  `images` each with `id`, `file_name`, `caption` (and `width`, `height`, `dataset_name`),
  `annotations` each with `image_id` and `bbox` [x, y, w, h]. An image entry with
  `tokens_positive_eval` is a caption whose phrases are grounded (one sample per phrase, its
  boxes the annotations whose `tokens_positive` spans overlap the phrase); without it, the
  caption is a referring expression (one sample, its boxes the image's annotations).
- Flickr30k Entities' own files: `<root>/Sentences/<id>.txt`, `<root>/Annotations/<id>.xml` and
  the split's id list `<root>/<split>.txt`; one sample per annotated phrase that has boxes.

Records that cannot be used (no image entry, no boxes, a span outside the caption, bad numbers)
are counted by reason in `Dataset.skipped`, never raised; a file that is not in a known format
raises DatasetError with one line saying what was expected.
"""
from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .boxes import Box, xywh_to_corners

REC, PHRASE = "rec", "phrase"


class DatasetError(ValueError):
    """An annotation source that cannot be read at all (missing, wrong format, empty)."""


@dataclass
class Sample:
    id: str                          # unique within the dataset; the key of resumed runs
    kind: str                        # rec | phrase
    image: str                       # image file path
    query: str                       # the expression or the phrase
    gt_boxes: List[Box]              # corners, source pixels
    context: str = ""                # phrase grounding: the caption before the phrase
    caption: str = ""
    categories: List[str] = field(default_factory=list)   # Flickr phrase types
    width: int = 0                   # from the annotation (0 = unknown)
    height: int = 0


@dataclass
class Dataset:
    name: str                        # refcoco | refcoco+ | refcocog | flickr30k_entities | ...
    split: str                       # val | testA | testB | test | ...
    samples: List[Sample]
    skipped: Counter = field(default_factory=Counter)   # reason -> count

    @property
    def label(self) -> str:
        return f"{self.name} {self.split}".strip()


def load_dataset(annotations: str, images: str, split: str = "", name: str = "") -> Dataset:
    """A JSON file (MDETR-style) or a Flickr30k Entities folder -> samples."""
    path = Path(annotations)
    if path.is_dir():
        return read_flickr_entities(path, Path(images), split=split or "test", name=name)
    if not path.is_file():
        raise DatasetError(f"annotations {annotations!r} not found: give an MDETR-style JSON file or a "
                           "Flickr30k Entities folder (with Sentences/ and Annotations/)")
    return read_mdetr_json(path, Path(images), split=split, name=name)


# -- MDETR-style COCO JSON --------------------------------------------------------------------------

_SPLIT_RE = re.compile(r"_(train|val|testA|testB|test)\.json$")


def read_mdetr_json(path: Path, images: Path, split: str = "", name: str = "") -> Dataset:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"{path} is not readable JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise DatasetError(f"{path} is not an MDETR/COCO annotation file: expected a JSON object with "
                           "'images' and 'annotations' lists")
    skipped: Counter = Counter()
    by_image: Dict[Any, List[dict]] = {}
    image_ids = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or "image_id" not in ann:
            skipped["malformed annotation"] += 1
        elif ann["image_id"] not in image_ids:
            skipped["annotation without an image entry"] += 1
        else:
            by_image.setdefault(ann["image_id"], []).append(ann)
    samples: List[Sample] = []
    seen_names: Counter = Counter()
    for img in data["images"]:
        try:
            found = _mdetr_samples(img, by_image.get(img.get("id"), []), images, skipped)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            skipped["malformed image entry"] += 1
            continue
        samples.extend(found)
        if found and isinstance(img.get("dataset_name"), str):
            seen_names[img["dataset_name"]] += 1
    match = _SPLIT_RE.search(path.name)
    if not name:
        name = _name_from_file(seen_names.most_common(1)[0][0] if seen_names else path.name)
    return Dataset(name=name, split=split or (match.group(1) if match else ""), samples=samples, skipped=skipped)


def _name_from_file(file_name: str) -> str:
    """A dataset_name or file name -> the name the paper's figures are filed under."""
    low = file_name.lower()
    if "flickr" in low:
        return "flickr30k_entities"
    for candidate in ("refcocog", "refcoco+", "refcoco"):
        if candidate in low:
            return candidate
    return Path(file_name).stem


def _mdetr_samples(img: dict, anns: List[dict], images: Path, skipped: Counter) -> List[Sample]:
    image_id, caption = img["id"], img["caption"]
    if not isinstance(caption, str) or not caption.strip():
        skipped["image entry without a caption"] += 1
        return []
    file_name = str(img["file_name"])
    width, height = int(img.get("width", 0) or 0), int(img.get("height", 0) or 0)
    image_path = _find_image(images, file_name)
    boxes = []
    for ann in anns:
        box = _valid_box(ann.get("bbox"))
        if box is None:
            skipped["annotation with a malformed bbox"] += 1
        else:
            boxes.append((box, ann))
    spans = img.get("tokens_positive_eval")
    if spans is None:   # referring expression: the caption is the expression
        if not boxes:
            skipped["expression without a box"] += 1
            return []
        return [Sample(id=str(image_id), kind=REC, image=image_path, query=caption.strip(),
                       gt_boxes=[b for b, _ in boxes], caption=caption, width=width, height=height)]
    out = []
    for index, group in enumerate(spans):
        start, end = (int(v) for v in group[0])
        if not 0 <= start < end <= len(caption):
            skipped["phrase span outside its caption"] += 1
            continue
        targets = [b for b, ann in boxes if _overlaps(ann.get("tokens_positive") or [], group)]
        if not targets:
            skipped["phrase without a box"] += 1
            continue
        out.append(Sample(id=f"{image_id}_{index}", kind=PHRASE, image=image_path, query=caption[start:end].strip(),
                          gt_boxes=targets, context=caption[:start], caption=caption, width=width, height=height))
    return out


def _overlaps(spans: Sequence[Sequence[int]], group: Sequence[Sequence[int]]) -> bool:
    return any(int(a[0]) < int(b[1]) and int(b[0]) < int(a[1]) for a in spans for b in group)


def _valid_box(bbox: Any) -> Optional[Box]:
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return None
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or values[2] < 0 or values[3] < 0:
        return None
    return xywh_to_corners(values)


def _find_image(images: Path, file_name: str) -> str:
    """`images/file_name`, or COCO's `images/train2014/file_name` layout the paper's scripts use."""
    direct = images / file_name
    if direct.is_file():
        return str(direct)
    for sub in ("train2014", "val2014", "flickr30k-images"):
        if (images / sub / file_name).is_file():
            return str(images / sub / file_name)
    return str(direct)   # missing: the runner counts it


# -- Flickr30k Entities' own files ------------------------------------------------------------------

_PHRASE_RE = re.compile(r"\[/EN#(\d+)((?:/[^\s\]]+)*)\s+([^\]]*)\]")


def parse_sentence(line: str) -> Tuple[str, List[Tuple[int, str, str, List[str]]]]:
    """'[/EN#1/people A man] walks' -> ('A man walks', [(word index, phrase, '1', ['people'])]).

    The same reading as flickr30k_entities_utils.get_sentence_data (words split on spaces).
    """
    words: List[str] = []
    phrases = []
    pos = 0
    for match in _PHRASE_RE.finditer(line):
        words += line[pos:match.start()].split()
        types = [t for t in match.group(2).split("/") if t]
        phrase_words = match.group(3).split()
        phrases.append((len(words), " ".join(phrase_words), match.group(1), types))
        words += phrase_words
        pos = match.end()
    words += line[pos:].split()
    return " ".join(words), phrases


def parse_annotation_xml(path: Path) -> Dict[str, Any]:
    """Flickr30k Entities' Annotations/<id>.xml -> {'width', 'height', 'boxes': {phrase id: [corners]}}.

    As the paper's reader: each <object> names phrase ids; one with a <bndbox> adds that box
    (xmin..xmax as written) to each of its names.
    """
    root = ET.parse(path).getroot()
    size = root.find("size")
    width = int(size.findtext("width", "0")) if size is not None else 0
    height = int(size.findtext("height", "0")) if size is not None else 0
    boxes: Dict[str, List[Box]] = {}
    for obj in root.findall("object"):
        bnd = obj.find("bndbox")
        if bnd is None:
            continue
        box = tuple(float(bnd.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax"))
        if not all(math.isfinite(v) for v in box):
            raise ValueError("bndbox without numbers")
        for name in obj.findall("name"):
            boxes.setdefault((name.text or "").strip(), []).append(box)   # type: ignore[arg-type]
    return {"width": width, "height": height, "boxes": boxes}


def read_flickr_entities(root: Path, images: Path, split: str = "test", name: str = "") -> Dataset:
    sentences_dir, annotations_dir = root / "Sentences", root / "Annotations"
    if not sentences_dir.is_dir() or not annotations_dir.is_dir():
        raise DatasetError(f"{root} is not a Flickr30k Entities folder: expected Sentences/ and Annotations/ in it")
    split_file = root / f"{split}.txt"
    if split_file.is_file():
        ids = [line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise DatasetError(f"{root} has no {split}.txt listing the {split!r} split's image ids "
                           "(flickr30k_entities ships train.txt, val.txt, test.txt)")
    skipped: Counter = Counter()
    samples: List[Sample] = []
    for image_id in ids:
        try:
            ann = parse_annotation_xml(annotations_dir / f"{image_id}.xml")
            lines = [s for s in (sentences_dir / f"{image_id}.txt").read_text(encoding="utf-8").split("\n") if s.strip()]
        except FileNotFoundError:
            skipped["image id without Sentences/Annotations files"] += 1
            continue
        except (ET.ParseError, OSError, UnicodeDecodeError, ValueError):
            skipped["malformed Sentences/Annotations file"] += 1
            continue
        image_path = _find_image(images, f"{image_id}.jpg")
        for sent_index, line in enumerate(lines):
            caption, phrases = parse_sentence(line)
            words = caption.split()
            for index, (first_word, phrase, phrase_id, types) in enumerate(phrases):
                targets = ann["boxes"].get(phrase_id)
                if not targets:
                    continue   # as the paper: phrases without boxes (scene, not visible) are not evaluated
                samples.append(Sample(id=f"{image_id}_{sent_index}_{index}", kind=PHRASE, image=image_path,
                                      query=phrase, gt_boxes=list(targets),
                                      context=" ".join(words[:first_word]), caption=caption, categories=types,
                                      width=ann["width"], height=ann["height"]))
    return Dataset(name=name or "flickr30k_entities", split=split, samples=samples, skipped=skipped)
