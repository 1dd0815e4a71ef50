"""Small benchmark files in the exact public layouts, written by the tests (nothing is downloaded)."""

import base64
import io
import json
import os

import numpy as np
from PIL import Image


def image(seed: int, size=(224, 168)) -> Image.Image:
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def jpeg_bytes(seed: int, size=(224, 168)) -> bytes:
  buf = io.BytesIO()
  image(seed, size).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


# (category, stem, question, options (correct first), boxes [x, y, w, h], targets)
VSTAR_ITEMS = [
  ("direct_attributes", "sa_1", "What is the color of the cup?", ["red", "blue", "green", "white"],
   [[20, 30, 60, 50]], ["cup"]),
  ("direct_attributes", "sa_2", "What is the material of the bench?", ["wood", "metal", "stone", "plastic"],
   [[100, 40, 70, 60]], ["bench"]),
  ("relative_position", "sa_3", "Is the dog on the left or right side of the cat?", ["left", "right"],
   [[10, 10, 40, 40], [150, 90, 50, 50]], ["dog", "cat"]),
]  # fmt: skip


def write_vstar(root: str, items=VSTAR_ITEMS) -> str:
  """The V* Bench release layout: <category>/<stem>.jpg + <stem>.json."""
  for k, (cat, stem, q, options, boxes, targets) in enumerate(items):
    os.makedirs(os.path.join(root, cat), exist_ok=True)
    with open(os.path.join(root, cat, stem + ".jpg"), "wb") as f:
      f.write(jpeg_bytes(k))
    ann = {"target_object": targets, "bbox": boxes, "question": q, "options": options}
    with open(os.path.join(root, cat, stem + ".json"), "w") as f:
      json.dump(ann, f)
  return root


HRBENCH_HEADER = ["index", "question", "answer", "A", "B", "C", "D", "category", "cycle_category", "image"]


def hrbench_rows(n=4):
  rows = []
  for i in range(n):
    b64 = base64.b64encode(jpeg_bytes(100 + i, (256, 192))).decode()
    rows.append(
      [str(i), f"What is written on sign {i}?", "ABCD"[i % 4], "stop", "slow", "exit", "yield",
       "single" if i % 2 == 0 else "cross", str(i // 4), b64]
    )  # fmt: skip
  return rows


def write_tsv(path: str, rows, header=HRBENCH_HEADER) -> str:
  with open(path, "w") as f:
    f.write("\t".join(header) + "\n")
    for r in rows:
      f.write("\t".join(r) + "\n")
  return path


def write_pope(root: str, n=4, category=None):
  """POPE question file (coco_pope_<cat>.json, JSON lines) + an image directory. Returns (file, image_dir)."""
  img_dir = os.path.join(root, "val2014")
  os.makedirs(img_dir, exist_ok=True)
  path = os.path.join(root, "coco_pope_adversarial.json")
  with open(path, "w") as f:
    for i in range(n):
      name = f"COCO_val2014_{i:012d}.jpg"
      with open(os.path.join(img_dir, name), "wb") as g:
        g.write(jpeg_bytes(200 + i))
      rec = {"question_id": i + 1, "image": name, "text": f"Is there a dog{i} in the image?",
             "label": "yes" if i % 2 == 0 else "no"}  # fmt: skip
      if category:
        rec["category"] = category
      f.write(json.dumps(rec) + "\n")
  return path, img_dir
