"""``python -m mvfast.demo``: pool a batch of variable-length clips with mvfast's fused ops.

Random per-frame features of a few videos of different lengths (padded and masked) are pooled by
NetVLAD (initialised by k-means on the features) and by attention pooling, forward and backward, on
every backend that can run here; each result is checked against the pure PyTorch reference and timed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import mvfast


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvfast.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=16, help="batch size B")
    parser.add_argument("--frames", type=int, default=120, help="frames of the longest video, M")
    parser.add_argument("--dim", type=int, default=512, help="feature size D")
    parser.add_argument("--clusters", type=int, default=32, help="NetVLAD clusters K")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per backend")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("videos", "frames", "dim", "clusters", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(args.seed)
    B, M, D = args.videos, args.frames, args.dim
    lengths = torch.randint(max(1, M // 3), M + 1, (B,), generator=g)
    lengths[0] = M
    mask = (torch.arange(M) < lengths[:, None]).to(device)
    x = torch.randn(B, M, D, generator=g).to(device)
    torch.manual_seed(args.seed)
    vlad = mvfast.nn.NetVLAD(D, args.clusters).to(device).init_from_data(x, mask, generator=g)
    attn = mvfast.nn.AttentionPool(D).to(device)
    with torch.no_grad():
        attn.weight.normal_(std=D**-0.5, generator=None)

    print(f"{B} videos of {lengths.min().item()}-{M} frames, {D}-d features, on {device}")
    print(
        f"NetVLAD K={args.clusters} -> {vlad.output_dim}-d descriptor; "
        f"attention pooling -> {attn.output_dim}-d"
    )

    def step(xx):
        v = vlad(xx, mask)
        a, weights = attn(xx, mask, return_weights=True)
        (v.square().sum() + a.square().sum()).backward()
        return v.detach(), a.detach(), weights.detach()

    xr = x.clone().requires_grad_()
    with mvfast.backend("reference"):
        ref = step(xr)
        ref_grad = xr.grad.clone()
        ref_ms = _median_ms(lambda: step(x.clone().requires_grad_()), args.repeats)

    table = mvfast.backends(device)
    print(f"\n{'backend':<10} {'max |diff| vs reference':>24} {'fwd+bwd ms':>11} {'speed-up':>9}")
    print(f"{'reference':<10} {'':>24} {ref_ms:>11.2f} {'1.00x':>9}")
    for name in ("cpu", "cuda", "triton"):
        if not table[name]["available"]:
            print(f"{name:<10} not available: {table[name]['reason']}")
            continue
        with mvfast.backend(name):
            xk = x.clone().requires_grad_()
            out = step(xk)
            diff = max((o.float() - r.float()).abs().max().item() for o, r in zip(out, ref, strict=True))
            diff = max(diff, (xk.grad - ref_grad).abs().max().item())
            ms = _median_ms(lambda: step(x.clone().requires_grad_()), args.repeats)
        print(f"{name:<10} {diff:>24.2e} {ms:>11.2f} {ref_ms / ms:>8.2f}x")

    weights = ref[2][0, :, 0]
    top = weights.topk(min(3, int(lengths[0]))).indices.tolist()
    print(f"\nkey frames of video 0 (highest attention weights): {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
