#!/usr/bin/env python3
"""PyTorch reference for fusion-serve's `FusionModel` (src/model/fusion.rs).

The module's `state_dict()` keys are exactly the tensor names the Rust model uses:
`image_encoder.*` (torchvision ResNet-18 without `fc`), `audio_encoder.*`
(`nn.LSTM(batch_first=True)`), `head.*` (`nn.Sequential(Linear, ReLU, ..., Linear)`).
Temporal pooling runs per sample on its unpadded frames with `F.max_pool1d`.

Commands (run from the repository root):

  # A parity fixture: random weights (with non-trivial batch-norm statistics), a
  # batch of real log-mel inputs of different lengths, and the expected outputs
  # computed per sample in float64 (eval mode with max and mean global pooling, and
  # one training-mode pass with the running statistics it leaves). Writes
  # OUT/config.json, OUT/model.safetensors, OUT/io.safetensors.
  python3 tests/reference/fusion_reference.py fixture --config CONFIG --out OUT \
      [--seed 0] [--lengths 23,10,3,2]

  # A model directory from a saved state_dict (torch.save(module.state_dict(), SD)).
  python3 tests/reference/fusion_reference.py export --config CONFIG --state-dict SD --out OUT

  # Load a model directory (e.g. one written by the Rust `weights::save_dir`) with
  # load_state_dict(strict=True), and optionally compare it with another directory.
  python3 tests/reference/fusion_reference.py check --dir DIR [--same-as DIR2]

The committed fixture tests/fixtures/parity_narrow/ was produced with
  python3 tests/reference/fusion_reference.py fixture \
      --config tests/fixtures/parity_narrow/config.json --out tests/fixtures/parity_narrow \
      --seed 0 --lengths 23,10,3,2
"""

import argparse
import copy
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
import torchvision
from safetensors.torch import load_file, save_file
from torchvision.models import resnet

# The defaults of src/model/config.rs (serde(default)): a config.json may omit fields.
DEFAULT_CONFIG = {
    "image": {
        "channels": 1,
        "height": 32,
        "width": 32,
        "mean": [0.1307],
        "std": [0.3081],
        "widths": [64, 128, 256, 512],
    },
    "audio": {
        "sample_rate": 8000,
        "n_fft": 256,
        "win_length": 256,
        "hop_length": 128,
        "n_mels": 40,
        "f_min": 20.0,
        "f_max": None,
        "log_eps": 1e-6,
    },
    "audio_encoder": {"hidden_size": 128, "num_layers": 2},
    "pooling": {"kernel": 3, "stride": 2, "global": "max"},
    "head": {"hidden": [256, 128]},
    "task": "multiclass",
    "labels": [str(d) for d in range(10)],
}

TORCHVISION_WIDTHS = [64, 128, 256, 512]


def load_config(path):
    with open(path) as f:
        user = json.load(f)
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    for key, value in user.items():
        if key not in cfg:
            raise SystemExit(f"{path}: unknown field {key!r}")
        if isinstance(cfg[key], dict):
            for sub, v in value.items():
                if sub not in cfg[key]:
                    raise SystemExit(f"{path}: unknown field {key}.{sub}")
                cfg[key][sub] = v
        else:
            cfg[key] = value
    return cfg


class NarrowResNet18(resnet.ResNet):
    """torchvision's ResNet-18 with configurable stage widths: torchvision's own
    `BasicBlock`, `_make_layer`, forward and initialisation, only the widths differ
    (torchvision hard-codes 64/128/256/512)."""

    def __init__(self, channels, widths):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(resnet.BasicBlock, widths[0], 2)
        self.layer2 = self._make_layer(resnet.BasicBlock, widths[1], 2, stride=2)
        self.layer3 = self._make_layer(resnet.BasicBlock, widths[2], 2, stride=2)
        self.layer4 = self._make_layer(resnet.BasicBlock, widths[3], 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def build_image_encoder(channels, widths):
    if list(widths) == TORCHVISION_WIDTHS:
        # The real thing: torchvision's resnet18 with fc removed and conv1 for `channels`.
        m = torchvision.models.resnet18(num_classes=1000)
        if channels != 3:
            m.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(m.conv1.weight, mode="fan_out", nonlinearity="relu")
        m.fc = nn.Identity()
        return m
    return NarrowResNet18(channels, widths)


def check_narrow_layout():
    """The hand-built ResNet at torchvision's widths has torchvision's exact state_dict."""
    a = NarrowResNet18(3, TORCHVISION_WIDTHS).state_dict()
    b = build_image_encoder(3, TORCHVISION_WIDTHS).state_dict()
    assert list(a.keys()) == list(b.keys()), "narrow ResNet layout differs from torchvision"
    assert all(a[k].shape == b[k].shape for k in a), "narrow ResNet shapes differ from torchvision"
    assert not any(k.startswith("fc.") for k in b)


class FusionReference(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        img, enc = cfg["image"], cfg["audio_encoder"]
        self.image_encoder = build_image_encoder(img["channels"], img["widths"])
        self.audio_encoder = nn.LSTM(
            cfg["audio"]["n_mels"], enc["hidden_size"], enc["num_layers"], batch_first=True
        )
        dims = [img["widths"][3] + enc["hidden_size"]] + list(cfg["head"]["hidden"]) + [len(cfg["labels"])]
        layers = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        self.head = nn.Sequential(*layers)

    def pool(self, frames):
        """(L, H) unpadded encoder outputs of one sample -> (H,)."""
        p = self.cfg["pooling"]
        k, s = p["kernel"], p["stride"]
        if frames.shape[0] >= k:
            windows = F.max_pool1d(frames.t().unsqueeze(0), k, s).squeeze(0)  # (H, W)
        else:
            windows = frames.max(0).values.unsqueeze(1)  # one window over all frames
        if p["global"] == "max":
            return windows.max(1).values
        return windows.mean(1)

    def forward(self, images, audio):
        """images (B, C, H, W) normalised; audio a list of unpadded (L_b, n_mels)."""
        fv = self.image_encoder(images)
        fa = torch.stack([self.pool(self.audio_encoder(a.unsqueeze(0))[0][0]) for a in audio])
        fused = torch.cat([fv, fa], 1)
        return {"image": fv, "audio": fa, "fused": fused, "logits": self.head(fused)}


def log_mel(cfg, waveform):
    a = cfg["audio"]
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=a["sample_rate"],
        n_fft=a["n_fft"],
        win_length=a["win_length"],
        hop_length=a["hop_length"],
        f_min=a["f_min"],
        f_max=a["f_max"],
        n_mels=a["n_mels"],
        window_fn=torch.hann_window,
        power=2.0,
        center=True,
        pad_mode="reflect",
        norm=None,
        mel_scale="htk",
    )
    return torch.log(mel(waveform) + a["log_eps"]).t().contiguous()  # (frames, n_mels)


def make_inputs(cfg, lengths, gen):
    img, a = cfg["image"], cfg["audio"]
    b = len(lengths)
    pixels = torch.rand(b, img["channels"], img["height"], img["width"], generator=gen)
    mean = torch.tensor(img["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(img["std"]).view(1, -1, 1, 1)
    images = ((pixels - mean) / std).float()
    hop, sr = a["hop_length"], a["sample_rate"]
    feats = []
    for length in lengths:
        # A chirp plus noise whose frame count (center=True) is exactly `length`; a
        # clip too short for the reflect padding is made longer and its leading
        # `length` frames kept.
        n = max((length - 1) * hop + hop // 2, a["n_fft"] // 2 + 1)
        t = torch.arange(n, dtype=torch.float64) / sr
        f0 = 200 + 1500 * torch.rand(1, generator=gen, dtype=torch.float64)
        wave = 0.5 * torch.sin(2 * math.pi * f0 * t * (1 + 2 * t)) + 0.05 * torch.randn(
            n, generator=gen, dtype=torch.float64
        )
        m = log_mel(cfg, wave.float())[:length]
        assert m.shape[0] == length, (m.shape, length)
        feats.append(m)
    t_max = max(lengths)
    # Padding frames hold large garbage: they must not influence anything.
    audio = 50.0 * torch.randn(b, t_max, a["n_mels"], generator=gen)
    for i, m in enumerate(feats):
        audio[i, : m.shape[0]] = m
    return images, audio, feats


def perturb_batch_norm(model, cfg, gen, steps=4):
    """Non-trivial BN affine parameters and running statistics: random weight/bias,
    then a few training-mode forwards so running_mean/var are neither 0 nor 1."""
    img = cfg["image"]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
        model.train()
        for _ in range(steps):
            x = 1.5 * torch.randn(8, img["channels"], img["height"], img["width"], generator=gen) + 0.3
            model.image_encoder(x)
    model.eval()


def save_model_dir(out, cfg, state_dict):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(out, "model.safetensors"))


def cmd_fixture(args):
    cfg = load_config(args.config)
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = FusionReference(cfg)
    perturb_batch_norm(model, cfg, gen)
    images, audio, feats = make_inputs(cfg, lengths, gen)
    save_model_dir(args.out, cfg, model.state_dict())

    io = {"images": images, "audio": audio, "lengths": torch.tensor(lengths, dtype=torch.int64)}
    # Expected outputs in float64 from the float32 weights and inputs, per sample on
    # the unpadded frames, for both global poolings.
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for mode in ("max", "mean"):
            ref.cfg = copy.deepcopy(cfg)
            ref.cfg["pooling"]["global"] = mode
            out = ref(images.double(), [f.double() for f in feats])
            for key, value in out.items():
                io[f"{mode}.{key}"] = value.contiguous()
    # One training-mode forward (batch-norm batch statistics, no dropout) on a copy:
    # its outputs and the running statistics it leaves behind.
    tr = copy.deepcopy(model).double().train()
    with torch.no_grad():
        out = tr(images.double(), [f.double() for f in feats])
    for key, value in out.items():
        io[f"train.{key}"] = value.contiguous()
    for name, buf in tr.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            io[f"train_state.{name}"] = buf.contiguous()
    save_file(io, os.path.join(args.out, "io.safetensors"))
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out} ({size} bytes); lengths {lengths}; pooling in config: {cfg['pooling']['global']}")


def cmd_export(args):
    cfg = load_config(args.config)
    model = FusionReference(cfg)
    model.load_state_dict(torch.load(args.state_dict, map_location="cpu"), strict=True)
    save_model_dir(args.out, cfg, model.state_dict())
    print(f"wrote {args.out}")


def load_model_dir(path):
    cfg = load_config(os.path.join(path, "config.json"))
    model = FusionReference(cfg)
    state = load_file(os.path.join(path, "model.safetensors"))
    model.load_state_dict(state, strict=True)
    return model.eval(), state


def cmd_check(args):
    model, state = load_model_dir(args.dir)
    n = sum(v.numel() for v in state.values())
    print(f"{args.dir}: load_state_dict(strict=True) ok, {len(state)} tensors, {n} values")
    if args.same_as:
        _, other = load_model_dir(args.same_as)
        for k, v in other.items():
            if not torch.equal(state[k], v):
                raise SystemExit(f"tensor {k} differs")
        print(f"identical to {args.same_as}")


def main():
    check_narrow_layout()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixture")
    f.add_argument("--config", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--lengths", default="23,10,3,2")
    e = sub.add_parser("export")
    e.add_argument("--config", required=True)
    e.add_argument("--state-dict", required=True)
    e.add_argument("--out", required=True)
    c = sub.add_parser("check")
    c.add_argument("--dir", required=True)
    c.add_argument("--same-as")
    args = p.parse_args()
    {"fixture": cmd_fixture, "export": cmd_export, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
