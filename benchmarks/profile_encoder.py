"""Where one encoder's fwd+bwd time goes: torch.profiler's top operators for one configuration and length.

    python benchmarks/profile_encoder.py mamba --length 16384 --threads 1

Builds the encoder exactly as encoder_scaling.py does, runs one warm-up step and profiles the next one, and prints the
operators with the most self CPU time. This is the first stop when a configuration misses its scaling target.
"""

from __future__ import annotations

import argparse

import torch
from encoder_scaling import SIZES, build_encoder
from scaling_report import CONFIGS
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", choices=list(CONFIGS))
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--size", default="small", choices=list(SIZES))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--top", type=int, default=15, help="operators to list")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = SIZES[args.size]
    encoder, extra = build_encoder(args.config, size, args.length)
    inputs = {"input_ids": torch.randint(4, size.vocab_size, (1, args.length)), **extra}
    grad_output = torch.randn(1, args.length, size.d_model)

    def step() -> None:
        encoder(**inputs).last_hidden_state.backward(grad_output)
        encoder.zero_grad(set_to_none=True)

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
