"""What every benchmark script shares: the naive loss, timers, inputs and memory readings.

Scripts in bench/ import it as `harness` (Python puts a script's folder on sys.path).
"""
import statistics
import time

import torch
import torch.nn.functional as F

SCALE = 1 / 0.07            # CLIP's initial logit scale


def naive_loss(q, k, scale=SCALE):
    """What users write today: the materializing symmetric CLIP loss,
    (CE(s q k^T, arange) + CE(s k q^T, arange)) / 2, with float32 logits for half inputs."""
    logits = (scale * (q @ k.T)).float()
    target = torch.arange(q.shape[0], device=q.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0     # SigLIP's initialisation


def naive_siglip(q, k, scale=SIGLIP_SCALE, bias=SIGLIP_BIAS):
    """What users write today (open_clip's SigLipLoss): logits = s q k^T + b, labels 2 I - 1,
    -sum log sigmoid(labels * logits) / N, with float32 logits for half inputs."""
    logits = (scale * (q @ k.T)).float() + bias
    labels = 2 * torch.eye(q.shape[0], k.shape[0], device=q.device) - 1
    return -F.logsigmoid(labels * logits).sum() / q.shape[0]


def inputs(n, d, seed=0, dtype=torch.float32, device="cpu", requires_grad=True):
    """Two (n, d) matrices of unit rows (a CLIP batch), reproducible by seed."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, device=device), dim=1).to(dtype)
    k = F.normalize(torch.randn(n, d, generator=g, device=device), dim=1).to(dtype)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad)


def seconds(fn, sync=None):
    """Wall time of one call of fn (sync(): wait for the device before reading the clock)."""
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def median_time(fn, repeats=3, warmup=0, sync=None):
    """Median seconds of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn, sync) for _ in range(repeats))


def status_bytes():
    """(VmRSS, VmHWM) of this process in bytes, from /proc/self/status (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out["VmRSS"], out["VmHWM"]


def reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0). False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
