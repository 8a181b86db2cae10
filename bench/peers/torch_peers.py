#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Times the MoE layers a PyTorch user would otherwise write, next to moe's own numbers.

Two peers, both SwiGLU experts with top-k softmax routing and autograd for fwd+bwd:
  loop     the usual user code: one masked matmul chain per expert, index_add_ back;
  grouped  argsort permutation + torch._grouped_mm (one grouped GEMM per projection).
moe's numbers come from its Google Benchmark JSON (bench/layer/layer_bench, run with
--benchmark_out=FILE --benchmark_out_format=json). The table gives each system's time and
useful TFLOP/s (padding excluded: 6·H·F FLOPs per routed row forward, 3x that fwd+bwd) and
the ratios of moe to the peers. Everything runs on the same GPU in the same session.

    python3 bench/peers/torch_peers.py --moe-json layer_bench.json [--tokens 8192 16384]
"""

import argparse
import json
import math
import sys

CONFIGS = {
    # name: hidden, ffn, experts, k (DESIGN §7)
    "mixtral": (4096, 14336, 8, 2),
    "deepseek_v3": (7168, 2048, 256, 8),
    "qwen3": (2048, 768, 128, 8),
    "gpt_oss": (2880, 2880, 128, 4),
}


def useful_flops(tokens, hidden, ffn, k, mode):
    forward = 6.0 * tokens * k * hidden * ffn
    return forward if mode == "forward" else 3.0 * forward


def make_layer(torch, hidden, ffn, experts, device):
    g = torch.Generator(device=device).manual_seed(0)

    def weight(*shape, fan_in):
        w = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
        return (w / math.sqrt(fan_in)).to(torch.bfloat16).requires_grad_(True)

    return {
        "gate": weight(hidden, experts, fan_in=hidden),
        "w13": weight(experts, hidden, 2 * ffn, fan_in=hidden),  # [gate | up]
        "w2": weight(experts, ffn, hidden, fan_in=ffn),
    }


def route(torch, x, p, k):
    logits = (x @ p["gate"]).float()
    scores = torch.softmax(logits, dim=-1)
    weight, expert = torch.topk(scores, k, dim=-1)
    weight = weight / weight.sum(dim=-1, keepdim=True)
    return weight.to(x.dtype), expert


def loop_layer(torch, x, p, k):
    """The plain layer: for each expert, the tokens routed to it, then index_add_."""
    weight, expert = route(torch, x, p, k)
    y = torch.zeros_like(x)
    ffn = p["w2"].shape[1]
    for e in range(p["w13"].shape[0]):
        token, choice = torch.where(expert == e)
        if token.numel() == 0:
            continue
        h = x[token] @ p["w13"][e]
        h = torch.nn.functional.silu(h[:, :ffn]) * h[:, ffn:]
        out = (h @ p["w2"][e]) * weight[token, choice].unsqueeze(-1)
        y = y.index_add(0, token, out)
    return y


def grouped_layer(torch, x, p, k):
    """Argsort permutation and torch._grouped_mm: what a careful PyTorch user writes."""
    weight, expert = route(torch, x, p, k)
    experts = p["w13"].shape[0]
    ffn = p["w2"].shape[1]
    flat = expert.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=experts)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    rows = x[token]
    h = torch._grouped_mm(rows, p["w13"], offs=offsets)
    h = torch.nn.functional.silu(h[:, :ffn]) * h[:, ffn:]
    out = torch._grouped_mm(h, p["w2"], offs=offsets)
    out = out * weight.reshape(-1)[order].unsqueeze(-1)
    return torch.zeros_like(x).index_add(0, token, out)


def time_ms(torch, fn, warmup=3, iterations=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]
    stop = [torch.cuda.Event(enable_timing=True) for _ in range(iterations)]
    for i in range(iterations):
        start[i].record()
        fn()
        stop[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(start, stop))
    return times[len(times) // 2]


def time_peer(torch, layer_fn, x, p, k, mode):
    if mode == "forward":
        def run():
            with torch.no_grad():
                layer_fn(torch, x, p, k)
    else:
        x_grad = x.detach().requires_grad_(True)
        dy = torch.randn_like(x)

        def run():
            for t in p.values():
                t.grad = None
            x_grad.grad = None
            layer_fn(torch, x_grad, p, k).backward(dy)
    try:
        return time_ms(torch, run)
    except (RuntimeError, AttributeError, TypeError) as error:  # e.g. no torch._grouped_mm
        print(f"  {layer_fn.__name__} {mode}: not measured ({error})", file=sys.stderr)
        return None


def moe_times(path):
    """Median milliseconds of moe's layer benchmarks, keyed (config, mode, tokens)."""
    if not path:
        return {}
    with open(path) as f:
        report = json.load(f)
    times = {}
    for b in report.get("benchmarks", []):
        # Names: layer/<config>/<forward|forward_backward>/T:<tokens>[/manual_time]
        parts = b.get("name", "").split("/")
        if len(parts) < 4 or parts[0] != "layer" or not parts[3].startswith("T:"):
            continue
        if any(p not in ("manual_time", "real_time") for p in parts[4:]):
            continue  # a variant the peers do not run (e.g. /capacity)
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b.get("time_unit", "ns")]
        times[(parts[1], parts[2], int(parts[3][2:]))] = b["real_time"] * scale
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe-json", help="moe's layer_bench JSON output")
    parser.add_argument("--configs", nargs="+", default=["mixtral", "qwen3"], choices=CONFIGS)
    parser.add_argument("--tokens", nargs="+", type=int, default=[8192, 16384])
    parser.add_argument("--modes", nargs="+", default=["forward", "forward_backward"])
    args = parser.parse_args()

    import torch  # imported here so that --help works without PyTorch

    if not torch.cuda.is_available():
        print("torch_peers: no CUDA device; nothing measured", file=sys.stderr)
        return 1
    ours = moe_times(args.moe_json)
    header = (f"{'config':<12} {'mode':<16} {'T':>6} {'loop ms':>9} {'grouped ms':>11} "
              f"{'moe ms':>8} {'moe TFLOP/s':>12} {'loop/moe':>9} {'grouped/moe':>12}")
    rows = []
    for name in args.configs:
        hidden, ffn, experts, k = CONFIGS[name]
        p = make_layer(torch, hidden, ffn, experts, "cuda")
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
            for mode in args.modes:
                loop = time_peer(torch, loop_layer, x, p, k, mode)
                grouped = time_peer(torch, grouped_layer, x, p, k, mode)
                moe = ours.get((name, mode, tokens))
                flops = useful_flops(tokens, hidden, ffn, k, mode)

                def fmt(v, width, digits=3):
                    return f"{v:>{width}.{digits}f}" if v else f"{'n/a':>{width}}"

                rows.append(
                    f"{name:<12} {mode:<16} {tokens:>6} {fmt(loop, 9)} {fmt(grouped, 11)} "
                    f"{fmt(moe, 8)} {fmt(moe and flops / moe * 1e-9, 12, 1)} "
                    f"{fmt(loop and moe and loop / moe, 9, 2)} "
                    f"{fmt(grouped and moe and grouped / moe, 12, 2)}")
            del x
        del p
        torch.cuda.empty_cache()
    print(header)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
