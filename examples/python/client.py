#!/usr/bin/env python3
"""A Python gRPC client for fusion-serve, generated from proto/ at run time.

    pip install grpcio grpcio-tools grpcio-health-checking
    python3 examples/python/client.py --server localhost:50051 --rows 0 1 2

Checks health, prints the model info, then sends real av-digits pairs (MNIST digit as
PNG + FSDD WAV) to Predict and prints each prediction next to the true label.
"""
import argparse
import csv
import importlib
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from av_pair_json import DEFAULT_DATA, mnist_image, png_grey  # noqa: E402


def generate_stubs():
    out = tempfile.mkdtemp(prefix="fusion-py-")
    proto_dir = os.path.join(ROOT, "proto")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{proto_dir}", f"-I{include}",
        f"--python_out={out}", f"--grpc_python_out={out}",
        os.path.join(proto_dir, "fusion", "v1", "fusion.proto"),
    ])
    if rc != 0:
        raise SystemExit("protoc failed")
    sys.path.insert(0, out)
    return (importlib.import_module("fusion.v1.fusion_pb2"),
            importlib.import_module("fusion.v1.fusion_pb2_grpc"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default="localhost:50051")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--split", default="test")
    ap.add_argument("--rows", type=int, nargs="+", default=[0])
    args = ap.parse_args()

    pb, pb_grpc = generate_stubs()
    channel = grpc.insecure_channel(args.server)
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        print("health:", health_pb2.HealthCheckResponse.ServingStatus.Name(status.status))
    except ImportError:
        pass
    stub = pb_grpc.FusionServiceStub(channel)
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    print(f"model {info.model_version} ({info.source}), untrained={info.untrained}, labels={list(info.labels)}")

    with open(os.path.join(args.data, "pairs.csv")) as f:
        pairs = [r for r in csv.DictReader(f) if r["split"] == args.split]
    chosen = [pairs[r] for r in args.rows]
    samples = []
    for pair in chosen:
        rows, cols, pixels = mnist_image(args.data, int(pair["mnist_index"]))
        with open(os.path.join(args.data, pair["wav"]), "rb") as f:
            wav = f.read()
        samples.append(pb.Sample(image=pb.Image(encoded=png_grey(cols, rows, pixels)), audio=pb.Audio(wav=wav)))
    reply = stub.Predict(pb.PredictRequest(samples=samples, top_k=3), timeout=30)
    print("model_version:", reply.model_version)
    for pair, p in zip(chosen, reply.predictions):
        top = ", ".join(f"{t.label}:{t.probability:.3f}" for t in p.top)
        print(f"{pair['wav']}: true {pair['label']} -> top {top}")

    try:
        stub.Predict(pb.PredictRequest(samples=[]), timeout=10)
    except grpc.RpcError as e:
        print("empty request ->", e.code().name, "-", e.details())


if __name__ == "__main__":
    main()
