#!/usr/bin/env python3
"""Print a Predict/Fuse request (grpcurl JSON) for real av-digits pairs.

Each sample is the pair's MNIST digit encoded as PNG plus its FSDD WAV file, both
base64 as protobuf JSON wants. Standard library only.

    python3 scripts/av_pair_json.py --split test --rows 0 1 \
      | grpcurl -plaintext -d @ localhost:50051 fusion.v1.FusionService/Predict
"""
import argparse
import base64
import csv
import gzip
import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "av-digits"))


def mnist_image(data_dir, index):
    with gzip.open(os.path.join(data_dir, "mnist", "t10k-images-idx3-ubyte.gz"), "rb") as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != 2051 or not 0 <= index < count:
            raise SystemExit(f"bad MNIST file or index {index}")
        f.seek(16 + index * rows * cols)
        return rows, cols, f.read(rows * cols)


def png_grey(width, height, pixels):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\x00" + pixels[y * width:(y + 1) * width] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="the av-digits folder")
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--rows", type=int, nargs="+", default=[0], help="row numbers within the split")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--fuse", action="store_true", help="emit a FuseRequest instead")
    args = ap.parse_args()

    with open(os.path.join(args.data, "pairs.csv")) as f:
        pairs = [r for r in csv.DictReader(f) if r["split"] == args.split]
    samples = []
    for row in args.rows:
        pair = pairs[row]
        rows, cols, pixels = mnist_image(args.data, int(pair["mnist_index"]))
        with open(os.path.join(args.data, pair["wav"]), "rb") as f:
            wav = f.read()
        samples.append({
            "image": {"encoded": base64.b64encode(png_grey(cols, rows, pixels)).decode()},
            "audio": {"wav": base64.b64encode(wav).decode()},
        })
    request = {"samples": samples}
    if args.fuse:
        request["includeModalities"] = True
    else:
        request["topK"] = args.top_k
    print(json.dumps(request))


if __name__ == "__main__":
    main()
