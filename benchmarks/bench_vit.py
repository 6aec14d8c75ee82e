"""Benchmark minimal3d.vit (fused scaled_dot_product_attention) against the same ViT with a naive attention
(explicit q k^T matrix, softmax, @ v), forward and forward+backward, on CPU and on CUDA when present.

Memory: CUDA = torch.cuda.max_memory_allocated during the timed calls; CPU = increase of the peak resident
set size (ru_maxrss) over the RSS before the first call, measured in a fresh subprocess per variant.
Time: median wall-clock seconds per call (``--timer wall``, default), or CPU seconds of the process summed
over its threads (``--timer process``, CPU only), which a machine shared with other jobs inflates less.

    python benchmarks/bench_vit.py                      # vit_small, batch 8, 224 and 448
    python benchmarks/bench_vit.py --timer process      # the same, CPU time (on a busy machine)
    python benchmarks/bench_vit.py --quick              # vit_tiny, batch 2, 224: a few seconds
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the minimal3d of this checkout
from minimal3d.vit import ARCHITECTURES  # noqa: E402


def naive_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The readable attention: A = softmax(q k^T / sqrt(hd)) materialised as (B, heads, N, N)."""
    batch, tokens, dim = x.shape
    q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) * (dim // self.num_heads) ** -0.5, dim=-1)
    return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


def build(arch: str, variant: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().to(device)
    if variant == "naive":
        for block in model.blocks:
            block.attn.forward = types.MethodType(naive_attention_forward, block.attn)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, device: torch.device, repeats: int, clock=time.perf_counter) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = clock()
        fn()
        sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def measure(arch: str, variant: str, mode: str, batch: int, size: int, device: torch.device, repeats: int,
            timer: str = "wall") -> dict:
    model = build(arch, variant, device)
    images = torch.randn(batch, 3, size, size, device=device)

    def forward():
        with torch.no_grad():
            model.forward_features(images)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model.forward_features(images)["x_norm_patchtokens"].square().mean().backward()

    fn = forward if mode == "fwd" else forward_backward
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = time.process_time if timer == "process" and device.type == "cpu" else time.perf_counter
    seconds = time_calls(fn, device, repeats, clock)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {"seconds": seconds, "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=None, choices=sorted(ARCHITECTURES), help="default vit_small")
    parser.add_argument("--batch", type=int, default=None, help="default 8")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default 224 448")
    parser.add_argument("--repeats", type=int, default=None, help="default 5")
    parser.add_argument("--timer", choices=("wall", "process"), default="wall",
                        help="wall: wall-clock time (default); process: CPU time of the process, on CPU")
    parser.add_argument("--quick", action="store_true", help="vit_tiny, batch 2, 224, 3 repeats")
    worker_fields = ("VARIANT", "MODE", "SIZE", "DEVICE", "ARCH")
    parser.add_argument("--worker", nargs=5, metavar=worker_fields, help=argparse.SUPPRESS)
    args = parser.parse_args()
    profile = dict(arch="vit_tiny", batch=2, sizes=[224], repeats=3) if args.quick else \
        dict(arch="vit_small", batch=8, sizes=[224, 448], repeats=5)
    for name, value in profile.items():  # an explicit flag is never overridden by --quick
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch < 1 or args.repeats < 1 or min(args.sizes) < 14:
        parser.error("--batch and --repeats must be >= 1 and --sizes >= 14")
    if args.worker:
        variant, mode, size, device, arch = args.worker
        print(json.dumps(measure(arch, variant, mode, args.batch, int(size), torch.device(device), args.repeats,
                                 args.timer)))
        return

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"arch {args.arch}, batch {args.batch}, median of {args.repeats}, threads {torch.get_num_threads()}, "
          f"timer {args.timer}")
    header = ("device", "size", "mode", "sdpa ms", "naive ms", "speed-up", "sdpa MB", "naive MB")
    print("{:6} {:>5} {:8} {:>9} {:>9} {:>8} {:>9} {:>9}".format(*header))
    for device in devices:
        for size in args.sizes:
            for mode in ("fwd", "fwd+bwd"):
                results = {}
                for variant in ("sdpa", "naive"):
                    command = [sys.executable, __file__, "--batch", str(args.batch), "--repeats", str(args.repeats),
                               "--timer", args.timer]
                    command += ["--worker", variant, mode, str(size), device, args.arch]
                    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                    results[variant] = json.loads(output.strip().splitlines()[-1])
                sdpa, naive = results["sdpa"], results["naive"]
                print(
                    f"{device:6} {size:5d} {mode:8} {sdpa['seconds'] * 1e3:9.1f} {naive['seconds'] * 1e3:9.1f} "
                    f"{naive['seconds'] / sdpa['seconds']:7.2f}x {sdpa['peak_mb']:9.1f} {naive['peak_mb']:9.1f}"
                )


if __name__ == "__main__":
    main()
