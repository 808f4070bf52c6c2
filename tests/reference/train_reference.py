#!/usr/bin/env python3
"""PyTorch reference for one training step of fusion-serve (src/training/trainer.rs).

Builds the reference module of tests/reference/fusion_reference.py (torchvision
ResNet-18 layout with its 3x3 stride-2 pad-1 max-pool stem, nn.LSTM, MLP head) from
a narrow config, with non-trivial batch-norm statistics, and a batch of 4 samples
whose log-mel inputs have different lengths (padded with garbage in the Rust batch).
Then, in float64 from the float32 weights and inputs, in training mode (batch-norm
batch statistics, running statistics updated; no dropout):

  loss = cross_entropy(logits, labels)   (mean over the batch)
  loss.backward()
  AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01).step()

and writes OUT/config.json, OUT/model.safetensors (the starting weights) and
OUT/step.safetensors with:
  images, audio, lengths, labels      the batch
  loss                                the loss (scalar)
  grad.<name>                         gradients of representative parameters
  bn_after.<name>                     every batch norm's running_mean/var after the step
  adamw.<name>                        the same parameters after one AdamW step

Command (from the repository root; produced the committed fixture):

  python3 tests/reference/train_reference.py --out tests/fixtures/train_step --seed 0
"""

import argparse
import copy
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fusion_reference as ref  # noqa: E402

CONFIG = {
    "image": {"widths": [4, 8, 8, 16]},
    "audio": {"n_mels": 16},
    "audio_encoder": {"hidden_size": 12, "num_layers": 2},
    "head": {"hidden": [16]},
    "labels": ["zero", "one", "two", "three", "four"],
}
LENGTHS = [23, 10, 3, 2]
LABELS = [0, 3, 1, 4]
PARAMS = [
    "image_encoder.conv1.weight",
    "image_encoder.bn1.weight",
    "image_encoder.layer1.0.conv1.weight",
    "image_encoder.layer2.0.downsample.0.weight",
    "image_encoder.layer2.0.downsample.1.bias",
    "image_encoder.layer4.1.conv2.weight",
    "audio_encoder.weight_ih_l0",
    "audio_encoder.weight_hh_l0",
    "audio_encoder.bias_hh_l0",
    "audio_encoder.weight_hh_l1",
    "head.0.weight",
    "head.0.bias",
    "head.2.weight",
]
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(CONFIG, f)
    cfg = ref.load_config(f.name)
    os.unlink(f.name)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = ref.FusionReference(cfg)
    ref.perturb_batch_norm(model, cfg, gen)
    images, audio, feats = ref.make_inputs(cfg, LENGTHS, gen)
    ref.save_model_dir(args.out, cfg, model.state_dict())

    m = copy.deepcopy(model).double().train()
    labels = torch.tensor(LABELS, dtype=torch.int64)
    out = m(images.double(), [x.double() for x in feats])
    loss = F.cross_entropy(out["logits"], labels)
    loss.backward()
    params = dict(m.named_parameters())
    step = {
        "images": images,
        "audio": audio,
        "lengths": torch.tensor(LENGTHS, dtype=torch.int64),
        "labels": labels,
        "loss": loss.detach().reshape(()),
    }
    for name in PARAMS:
        step[f"grad.{name}"] = params[name].grad.detach().contiguous()
    for name, buf in m.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            step[f"bn_after.{name}"] = buf.detach().contiguous()
    opt = torch.optim.AdamW(m.parameters(), **ADAMW)
    opt.step()
    for name in PARAMS:
        step[f"adamw.{name}"] = params[name].detach().contiguous()
    save_file(step, os.path.join(args.out, "step.safetensors"))
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out} ({size} bytes); loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
