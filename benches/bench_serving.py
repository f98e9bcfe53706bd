"""Serving benchmark: base vs eigenpruned vs extracted, eager / compiled / ONNX Runtime (`eigenfast bench`).

Usage: python benches/bench_serving.py [eigenfast bench options], e.g.
    python benches/bench_serving.py --shape small --batches 1,32 --prompts 16,512 --out docs/serving/cpu
"""
from __future__ import annotations

import sys

from eigenfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
