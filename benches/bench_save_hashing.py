"""What verifying a save's hashes costs: SHA-256 of a 1 GB weights file against reading its tensors.

    python benches/bench_save_hashing.py [--gigabytes 1] [--rounds 3] [--folder /tmp]

Writes one safetensors file of float32 noise (a stand-in for a 1 GB model.safetensors),
then alternates, ``--rounds`` times: eigenfast's streamed SHA-256 of the file (what
``eigenfast.load`` runs on every file of a save) and ``safetensors.torch.load_file`` of it with a
copy of every tensor (what a load does anyway: safetensors maps the file, the model's
parameters receive a copy). The file is read once before timing,
so both read from the page cache: the numbers are the CPU cost of each. Prints the
median of each, the hashing rate in MB/s on this machine and the ratio of the two.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from eigenfast.saving.checksums import sha256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = Path(folder) / "model.safetensors"
        elements = int(args.gigabytes * 1e9) // 4
        save_file({"weight": torch.randn(elements)}, str(path))
        size = path.stat().st_size
        sha256(path)  # into the page cache
        hashing, reading = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            sha256(path)
            hashing.append(time.perf_counter() - start)
            start = time.perf_counter()
            weights = {k: v.clone() for k, v in load_file(str(path)).items()}  # a load copies into the model
            reading.append(time.perf_counter() - start)
            del weights
    hash_s, read_s = statistics.median(hashing), statistics.median(reading)
    print(f"file: {size / 1e9:.2f} GB; median of {args.rounds} rounds, threads: {torch.get_num_threads()}")
    print(f"sha256 (streamed, 1 MiB blocks): {hash_s:.2f} s = {size / 1e6 / hash_s:.0f} MB/s")
    print(f"safetensors load_file + copy:    {read_s:.2f} s = {size / 1e6 / read_s:.0f} MB/s")
    print(f"hashing / reading the weights:   {hash_s / read_s:.2f}x")


if __name__ == "__main__":
    main()
