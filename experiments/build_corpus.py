"""Builds the built-in corpus (lrjax/assets/corpus) from CPython 3.11's standard-library sources.

The corpus ships in the repository, so nothing here runs at install time; this script documents and
reproduces it: `python experiments/build_corpus.py --stdlib=/path/to/lib/python3.11`.

Documents are whole .py files (tests and site-packages excluded), in sorted path order. Held-out splits take
long files (>= 24 KiB, enough for 64x a 256-token window in bytes) chosen by the SHA-1 of their path:
16 for `valid` (search fitness) and 16 for `test` (reported figures); every other file is `train`.
"""

import argparse
import gzip
import hashlib
import json
import os
import pathlib
import sysconfig

HELD_OUT_MIN_BYTES = 24 * 1024
HELD_OUT_PER_SPLIT = 16


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "lrjax", "assets", "corpus"))
  args = parser.parse_args()
  root = pathlib.Path(args.stdlib)
  skip = {"site-packages", "test", "tests", "idle_test"}
  files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))
  docs = {str(p.relative_to(root)): p.read_text("utf-8", errors="replace") for p in files}
  long_docs = sorted((n for n, t in docs.items() if len(t.encode()) >= HELD_OUT_MIN_BYTES),
                     key=lambda n: hashlib.sha1(n.encode()).hexdigest())
  splits = {"valid": long_docs[:HELD_OUT_PER_SPLIT],
            "test": long_docs[HELD_OUT_PER_SPLIT:2 * HELD_OUT_PER_SPLIT]}
  held = set(splits["valid"]) | set(splits["test"])
  splits["train"] = [n for n in docs if n not in held]
  os.makedirs(args.out, exist_ok=True)
  manifest = {}
  for split, names in splits.items():
    path = os.path.join(args.out, f"{split}.jsonl.gz")
    with gzip.GzipFile(path, "wb", mtime=0) as f:
      for name in sorted(names):
        f.write((json.dumps({"id": name, "text": docs[name]}) + "\n").encode())
    manifest[split] = {"documents": len(names), "bytes": sum(len(docs[n].encode()) for n in names),
                       "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    print(split, manifest[split])
  with open(os.path.join(args.out, "MANIFEST.json"), "w") as f:
    json.dump({"source": "CPython 3.11 standard library", **manifest}, f, indent=1)


if __name__ == "__main__":
  main()
