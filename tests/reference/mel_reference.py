#!/usr/bin/env python3
"""Generates tests/fixtures/mel_parity.safetensors: torchaudio log-mel references for
tests/mel_parity.rs.

Reference (what the Rust front end must match), per config:

    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=sr, n_fft=n_fft, win_length=win_length, hop_length=hop_length,
        f_min=f_min, f_max=f_max, n_mels=n_mels, window_fn=torch.hann_window,
        power=2.0, center=True, pad_mode="reflect", norm=None, mel_scale="htk")
    expected = torch.log(mel(x) + log_eps).T          # frames x n_mels, float32

torch.stft refuses reflect padding of a clip with <= n_fft // 2 samples; the Rust
front end first zero-pads such a clip at the end to n_fft // 2 + 1 samples, and so
does this script (see `pad_short`), so the short-clip case is tested too.

Inputs:
- one real recording, FSDD `fsdd/0_jackson_0.wav` (8 kHz, 16-bit PCM), read with
  Python's `wave` module and scaled by 1/32768. Only its *log-mel* goes into the
  fixture; the Rust test reads the WAV itself from ../shared/data/av-digits.
- synthetic waveforms (tones, a chirp, noise, a short clip), stored in the fixture as
  `wave/<name>` (float32) because they are ours.

Fixture layout (safetensors, all float32):
    wave/<name>               1-D synthetic input
    mel/<config>/<name>       frames x n_mels expected log-mel (torch float32)
    mel64/<config>/<name>     the same computed in float64 (for the record)
metadata: "configs" (JSON: name -> AudioConfig fields), "fsdd" (JSON: name -> path
relative to av-digits), "generator" (versions).

Run from the crate root:  python3 tests/reference/mel_reference.py
"""

import json
import os
import wave

import numpy as np
import torch
import torchaudio
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "av-digits")
OUT = os.path.join(ROOT, "tests", "fixtures", "mel_parity.safetensors")

CONFIGS = {
    # The built-in model's front end (AudioConfig::default()).
    "default": dict(sample_rate=8000, n_fft=256, win_length=256, hop_length=128,
                    n_mels=40, f_min=20.0, f_max=None, log_eps=1e-6),
    # win_length < n_fft (an odd one: the window sits 49 zeros from the left), a
    # non-power-of-two n_fft, an explicit f_max and another sample rate.
    "narrow_window": dict(sample_rate=16000, n_fft=400, win_length=301, hop_length=160,
                          n_mels=64, f_min=60.0, f_max=7600.0, log_eps=1e-5),
}

FSDD = {"fsdd_0_jackson_0": "fsdd/0_jackson_0.wav"}


def read_wav_mono(path):
    with wave.open(path, "rb") as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1, path
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def synthetic():
    rng = np.random.RandomState(1234)
    t = np.arange(3001) / 8000.0
    tones = 0.6 * np.sin(2 * np.pi * 440.0 * t) + 0.3 * np.sin(2 * np.pi * 1234.5 * t + 0.7)
    tc = np.arange(2000) / 8000.0
    chirp = 0.8 * np.sin(2 * np.pi * (100.0 * tc + 0.5 * 3500.0 * tc * tc / tc[-1]))
    noise = 0.1 * rng.randn(1000)
    # Silence, a burst, silence again: the log floor matters here.
    burst = np.zeros(1500)
    burst[600:900] = 0.5 * rng.randn(300)
    return {
        "tones": tones,
        "chirp": chirp,
        "noise": noise,
        "burst": burst,
        "just_over_half_window": 0.5 * rng.randn(201),  # > n_fft//2 for both configs
        "short": 0.5 * rng.randn(50),  # <= n_fft//2 for both: zero-padded first
        "one_sample": np.array([0.25]),
    }


def pad_short(x, n_fft):
    need = n_fft // 2 + 1
    if x.shape[0] < need:
        x = torch.cat([x, torch.zeros(need - x.shape[0], dtype=x.dtype)])
    return x


def log_mel(x, cfg, dtype):
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg["sample_rate"], n_fft=cfg["n_fft"], win_length=cfg["win_length"],
        hop_length=cfg["hop_length"], f_min=cfg["f_min"], f_max=cfg["f_max"],
        n_mels=cfg["n_mels"], window_fn=torch.hann_window, power=2.0, center=True,
        pad_mode="reflect", norm=None, mel_scale="htk").to(dtype)
    x = pad_short(torch.as_tensor(x, dtype=dtype), cfg["n_fft"])
    return torch.log(mel(x) + cfg["log_eps"]).T.contiguous()


def main():
    waves = {k: v.astype(np.float32) for k, v in synthetic().items()}
    inputs = dict(waves)
    for name, rel in FSDD.items():
        inputs[name] = read_wav_mono(os.path.join(DATA, rel))

    tensors = {f"wave/{k}": v for k, v in waves.items()}
    for cname, cfg in CONFIGS.items():
        for wname, x in inputs.items():
            ref32 = log_mel(x, cfg, torch.float32)
            ref64 = log_mel(x.astype(np.float64), cfg, torch.float64)
            n = x.shape[0]
            frames = 1 + (max(n, cfg["n_fft"] // 2 + 1) + 2 * (cfg["n_fft"] // 2) - cfg["n_fft"]) \
                // cfg["hop_length"]
            assert ref32.shape == (frames, cfg["n_mels"]), (cname, wname, ref32.shape)
            gap = (ref32.double() - ref64).abs().max().item()
            print(f"{cname:14s} {wname:22s} {tuple(ref32.shape)}  |f32 - f64| max {gap:.2e}")
            tensors[f"mel/{cname}/{wname}"] = ref32.numpy()
            tensors[f"mel64/{cname}/{wname}"] = ref64.float().numpy()

    metadata = {
        "configs": json.dumps(CONFIGS),
        "fsdd": json.dumps(FSDD),
        "generator": f"tests/reference/mel_reference.py; torch {torch.__version__}, "
                     f"torchaudio {torchaudio.__version__}",
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata=metadata)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
