"""Encoder-only scaling sweep: forward + backward time, throughput, peak memory and matmul-FLOP utilization of every
encoder configuration (our mixers, the LED and LongT5 peers, an FFN-only floor) against sequence length.

    python benchmarks/encoder_scaling.py                 # full CPU sweep, 1K..64K tokens (what `make bench` runs)
    python benchmarks/encoder_scaling.py --quick         # smoke test: 1K..4K, one repeat
    python benchmarks/encoder_scaling.py --size bart-base --device cuda --kinds mamba2 led

Every (configuration, length) runs in a fresh worker process (`--worker '<json>'`), so one run's allocator state,
caches and peak never leak into the next. The parent only schedules, enforces the per-run time and memory limits
(a run over either is recorded as `timeout` / `oom` and the sweep goes on) and writes the results; see
`scaling_report.py` for the CSV, markdown and plot, and docs/benchmarks.md for how to read them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from scaling_report import CONFIGS, write_outputs
from torch import nn

DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
QUICK_LENGTHS = [1024, 2048, 4096]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Size:
    """Width, depth and FFN shared by every configuration, so only the token mixer differs between them."""

    d_model: int
    layers: int
    ffn_dim: int
    heads: int
    window: int  # block-local / LED attention window; LongT5's local radius is window // 4 - 1 (127 at 512)
    vocab_size: int = 50265  # BART's, for every configuration: the embedding gradient costs the same everywhere


SIZES = {
    "tiny": Size(d_model=32, layers=2, ffn_dim=64, heads=2, window=32),  # smoke tests only
    "small": Size(d_model=256, layers=4, ffn_dim=1024, heads=4, window=512),
    "bart-base": Size(d_model=768, layers=6, ffn_dim=3072, heads=12, window=512),
}

# Which MIXERS entries each of our configurations needs; a configuration whose kinds are not registered is skipped.
REQUIRED_KINDS = {
    "s4d": {"s4d"},
    "mamba": {"mamba"},
    "mamba2": {"mamba2"},
    "gss-hybrid": {"gss", "attention"},
    "attention": {"attention"},
    "local-attention": {"attention"},
    "ffn-only": {"attention"},  # built with attention blocks whose mixers are then removed
}


# --------------------------------------------------------------------------------------------------- worker side
class IdentityMixer(nn.Module):
    """Stands in for a block's mixer in the FFN-only floor: embeddings, norms and FFNs are all that is left."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return hidden_states


def layer_types(config: str, layers: int) -> list[str]:
    """Our configurations as `encoder_layer_types`. The hybrid puts one (block-local) attention layer on top of GSS
    layers, as GSS-Hybrid does, so it stays linear in length."""
    if config == "gss-hybrid":
        return ["gss"] * (layers - 1) + ["attention"]
    if config in ("attention", "local-attention", "ffn-only"):
        return ["attention"] * layers
    return [config] * layers


def build_encoder(
    config: str, size: Size, length: int, family: str = "bart"
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The encoder of `config` at `size` with random weights, and the extra inputs its forward wants.

    `family="t5"` builds our configurations as T5-family encoders (pre-norm RMS-norm blocks, relative-position
    attention; `local-attention` and the hybrid's attention are LongT5's local attention with radius `window`); the
    peers (`led`, `longt5-tglobal`) are the same in both. Dropout is off everywhere: it would add masks (memory) that
    have nothing to do with the token mixer."""
    common = dict(vocab_size=size.vocab_size, d_model=size.d_model)
    if config == "led":
        from transformers import LEDConfig, LEDModel

        # LED pads the input to a multiple of its window; its learned positions must cover the padded length.
        padded = -(-length // size.window) * size.window
        led = LEDModel(
            LEDConfig(
                **common,
                encoder_layers=size.layers,
                encoder_ffn_dim=size.ffn_dim,
                encoder_attention_heads=size.heads,
                decoder_layers=1,
                decoder_ffn_dim=size.ffn_dim,
                decoder_attention_heads=size.heads,
                attention_window=[size.window] * size.layers,
                max_encoder_position_embeddings=padded,
                dropout=0.0,
            )
        )
        # SCROLLS' LED baseline: global attention on the first token.
        global_attention = torch.zeros(1, length, dtype=torch.long)
        global_attention[:, 0] = 1
        return led.get_encoder(), {"global_attention_mask": global_attention}
    if config == "longt5-tglobal":
        from transformers import LongT5Config, LongT5Model

        longt5 = LongT5Model(
            LongT5Config(
                **common,
                d_kv=size.d_model // size.heads,
                d_ff=size.ffn_dim,
                num_layers=size.layers,
                num_decoder_layers=1,
                num_heads=size.heads,
                local_radius=size.window // 4 - 1,
                global_block_size=16,
                encoder_attention_type="transient-global",
                feed_forward_proj="gelu",  # BART's FFN: two matrices and a GELU
                dropout_rate=0.0,
            )
        )
        return longt5.get_encoder(), {}

    if family == "t5":
        return _build_t5_encoder(config, size), {}

    from scrolls_ssm.modeling.configuration_scrolls_ssm import ScrollsSSMConfig
    from scrolls_ssm.modeling.modeling_scrolls_ssm import ScrollsSSMEncoder

    encoder = ScrollsSSMEncoder(
        ScrollsSSMConfig(
            **common,
            encoder_layers=size.layers,
            encoder_ffn_dim=size.ffn_dim,
            encoder_attention_heads=size.heads,
            encoder_layer_types=layer_types(config, size.layers),
            max_source_positions=length,
            attention_window=None if config == "attention" else size.window,
            dropout=0.0,
            attn_implementation="sdpa",
        )
    )
    if config == "ffn-only":
        for block in encoder.layers:
            block.mixer = IdentityMixer()
    return encoder, {}


def _build_t5_encoder(config: str, size: Size) -> nn.Module:
    from scrolls_ssm.modeling.configuration_scrolls_ssm_t5 import ScrollsSSMT5Config
    from scrolls_ssm.modeling.modeling_scrolls_ssm_t5 import ScrollsSSMT5Encoder

    encoder = ScrollsSSMT5Encoder(
        ScrollsSSMT5Config(
            vocab_size=size.vocab_size,
            d_model=size.d_model,
            d_kv=size.d_model // size.heads,
            d_ff=size.ffn_dim,
            num_layers=size.layers,
            num_heads=size.heads,
            feed_forward_proj="gelu",  # BART's FFN: two matrices and a GELU, as the LongT5 peer
            encoder_layer_types=layer_types(config, size.layers),
            encoder_attention_type="full" if config == "attention" else "local",
            local_radius=size.window,
            dropout_rate=0.0,
            attn_implementation="sdpa",
        )
    )
    if config == "ffn-only":
        for block in encoder.layers:
            block.kind, block.mixer = "ffn-only", IdentityMixer()  # called as a plain mixer: (hidden, mask)
    return encoder


def _rss_bytes() -> int:
    """Resident memory of this process now."""
    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes(reset_worked: bool) -> int:
    """VmHWM since the reset; without one, the lifetime peak `ru_maxrss` (an upper bound of the measured peak)."""
    if reset_worked:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """The machine's dense matmul rate in FLOP/s (best of 3 large square matmuls), the denominator of utilization."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):  # the first one warms up threads / cuBLAS and is never the best
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)  # FlopCounterMode passes shapes, not tensors


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(step) -> int:
    """Matmul FLOPs of one fwd+bwd step. FlopCounterMode counts matmuls, convolutions and SDPA only: FFTs, scans and
    elementwise work are free to it, hence "matmul-FLOP utilization". It has no formula for the CPU flash-attention
    kernel that SDPA dispatches to on CPU (it would count 0), so the generic SDPA formulas are registered for it."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        step()
    return counter.get_total_flops()


def measure(spec: dict) -> dict:
    """One (configuration, length) run in this process: a warm-up step, timed fwd+bwd steps and their peak memory,
    then one FLOP-counted step."""
    size, length, device = Size(**spec["size"]), spec["length"], torch.device(spec["device"])
    if spec.get("retain_freed_memory") and device.type == "cpu":
        # What the training loop does on a CPU (train.retain_freed_memory): freed memory reused, not re-faulted.
        from scrolls_ssm.cpu_memory import retain_freed_memory

        retain_freed_memory()
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CUDA runs under bf16 autocast
    rate = matmul_rate(device, dtype)

    encoder, extra = build_encoder(spec["config"], size, length, spec.get("family", "bart"))
    encoder.to(device).train()
    if spec.get("gradient_checkpointing"):
        # Each block's activations recomputed in backward: what a user turns on to fit 64K tokens.
        enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
        enable()  # transformers 5.24 renamed it; the old name warns
    inputs = {
        "input_ids": torch.randint(4, size.vocab_size, (1, length), device=device),
        "attention_mask": torch.ones(1, length, dtype=torch.long, device=device),
        **{name: value.to(device) for name, value in extra.items()},
    }
    grad_output = torch.randn(1, length, size.d_model, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            hidden = encoder(**inputs).last_hidden_state
        hidden.backward(grad_output.to(hidden.dtype))
        encoder.zero_grad(set_to_none=True)  # every step allocates its gradients afresh, as a training step does

    # Peak memory is the growth over the resident (or allocated) memory just before the first step, taken over the
    # warm-up and the timed steps together: the first step's one-off allocations are memory a run really needs.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        reset_worked = _reset_peak_rss()  # first, so that the baseline is read after the mark moved to the current RSS
        baseline = _rss_bytes()
    step()  # untimed warm-up
    times, cpu_times = [], []
    for _ in range(spec["repeats"]):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        # Pages the allocator hands back between the two reads can put the mark a few kB under the baseline: that is
        # no growth, not negative growth.
        peak = max(0, _peak_rss_bytes(reset_worked) - baseline)
    # FLOPs are counted in one more step, after the peak is read. Under FlopCounterMode activation checkpointing frees
    # nothing (bart-base Mamba-2 at 4K: 6.3 GiB against 2.2 GiB without the counter), so a checkpointed run, which is
    # one that needs the memory, is not counted (NaN): the counted step would not fit where the timed ones do.
    flops = float("nan") if spec.get("gradient_checkpointing") else count_flops(step)

    median = statistics.median(times)
    return {
        "status": "ok",
        "time_s": median,
        "time_min_s": min(times),
        # CPU seconds of all this process's threads: unlike wall time it barely moves when other processes compete
        # for the cores, so it tells a slow run from a crowded machine.
        "cpu_s": statistics.median(cpu_times),
        "tokens_per_s": length / median,
        "peak_mem_mb": peak / 2**20,
        "gflop": flops / 1e9,
        "achieved_gflops": flops / median / 1e9,
        "matmul_gflops": rate / 1e9,
        "matmul_util": flops / median / rate,
        "params_m": sum(p.numel() for p in encoder.parameters()) / 1e6,
        "threads": torch.get_num_threads(),
        "dtype": "bf16-autocast" if device.type == "cuda" else "float32",
    }


def worker_main(spec_json: str) -> None:
    """Entry point of a worker process: prints one `RESULT {json}` line (an out-of-memory error is a result)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # LED announces its padding on every call
    spec = json.loads(spec_json)
    try:
        result = measure(spec)
    except torch.OutOfMemoryError as error:
        result = {"status": "oom", "note": str(error).splitlines()[0][:200]}
    except RuntimeError as error:
        if "can't allocate memory" not in str(error):
            raise
        result = {"status": "oom", "note": str(error).splitlines()[0][:200]}
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------- parent side
def missing_kinds(config: str) -> str | None:
    """Why `config` cannot run yet (its mixer kinds are not registered), or None when it can."""
    if config not in REQUIRED_KINDS:
        return None
    try:
        from scrolls_ssm.modeling.mixers import MIXERS
    except ImportError as error:
        return f"scrolls_ssm does not import: {error}"
    missing = sorted(REQUIRED_KINDS[config] - set(MIXERS))
    return f"mixer kind(s) {missing} not registered in scrolls_ssm.modeling.mixers.MIXERS" if missing else None


def run_worker(spec: dict, timeout_s: float, max_rss_bytes: int) -> dict:
    """Runs one worker process, killing it past the time or memory limit; returns its result row fields.

    The RSS limit is enforced here, by polling, rather than left to the kernel's OOM killer, so that a run that would
    exhaust a shared machine is stopped early and recorded instead of taking other processes down with it."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        start, verdict = time.monotonic(), None
        while process.poll() is None:
            try:
                rss = psutil.Process(process.pid).memory_info().rss
            except psutil.NoSuchProcess:
                rss = 0
            if rss > max_rss_bytes:
                verdict = {"status": "oom", "note": f"killed at {rss / 2**30:.1f} GiB RSS (limit --max-rss-gb)"}
            elif time.monotonic() - start > timeout_s:
                verdict = {"status": "timeout", "note": f"killed after {timeout_s:.0f} s (limit --timeout)"}
            if verdict:
                process.kill()
                process.wait()
                return verdict
            time.sleep(0.25)
        out.seek(0)
        err.seek(0)
        results = [line[len("RESULT ") :] for line in out.read().splitlines() if line.startswith("RESULT ")]
        if results:
            return json.loads(results[-1])
        stderr = err.read().strip().splitlines()
        if process.returncode < 0:  # killed from outside, most likely by the kernel's OOM killer
            return {"status": "oom", "note": f"worker killed by signal {-process.returncode}"}
        return {"status": "error", "note": (stderr[-1] if stderr else f"exit code {process.returncode}")[:300]}


def load_previous(path: Path) -> dict[tuple[str, int], dict]:
    """Rows of an earlier sweep to keep under --resume: every finished run (ok / oom / timeout / error)."""
    import csv

    if not path.exists():
        return {}
    with path.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["status"] != "skipped"]
    return {(row["config"], int(row["length"])): row for row in rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one measurement and print its result
    parser.add_argument("--kinds", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="configurations")
    parser.add_argument("--lengths", nargs="+", type=int, help=f"sequence lengths (default {DEFAULT_LENGTHS})")
    parser.add_argument("--size", default="small", choices=list(SIZES), help="width/depth/FFN (default small)")
    parser.add_argument(
        "--family",
        default="bart",
        choices=["bart", "t5"],
        help="our configurations as BART-family (post-norm) or T5-family (pre-norm, relative positions) encoders; "
        "files end in _t5",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda runs under bf16 autocast")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up; the median is kept")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: torch's, one per core)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per run before it is killed")
    parser.add_argument("--max-rss-gb", type=float, help="worker RSS limit (default 80%% of available memory)")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: lengths {QUICK_LENGTHS}, 1 repeat")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each encoder block in backward (activation checkpointing); files end in _gc",
    )
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="CPU: keep freed memory for reuse in every worker (glibc mallopt, as the training loop does); files end "
        "in _retain",
    )
    parser.add_argument("--resume", action="store_true", help="keep finished runs from an earlier CSV, run the rest")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = args.lengths or QUICK_LENGTHS, 1
    args.lengths = sorted(args.lengths or DEFAULT_LENGTHS)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Runs the sweep and returns the path of the CSV it wrote."""
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return Path()
    size = SIZES[args.size]
    max_rss = int((args.max_rss_gb or 0.8 * psutil.virtual_memory().available / 2**30) * 2**30)
    stem = f"encoder_scaling_{args.device}_{args.size}" + ("_t5" if args.family == "t5" else "")
    stem += "_gc" if args.gradient_checkpointing else ""
    stem += "_retain" if args.retain_freed_memory and args.device == "cpu" else ""
    stem += "_quick" if args.quick else ""
    csv_path = args.out / f"{stem}.csv"
    previous = load_previous(csv_path) if args.resume else {}
    command = "python benchmarks/encoder_scaling.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "size": args.size, "device": args.device, "family": args.family}
    meta.update(asdict(size))

    rows: list[dict] = []
    total, done = len(args.kinds) * len(args.lengths), 0
    for config in args.kinds:
        blocked = missing_kinds(config)  # a config that failed at one length is not tried at longer ones
        for length in args.lengths:
            done += 1
            base = {"config": config, "length": length, "device": args.device, "repeats": args.repeats}
            if (config, length) in previous:
                rows.append(previous[(config, length)])
                print(f"[{done}/{total}] {config} L={length}: kept from {csv_path.name}", flush=True)
                continue
            if blocked:
                rows.append({**base, "status": "skipped", "note": blocked})
                print(f"[{done}/{total}] {config} L={length}: skipped ({blocked})", flush=True)
                continue
            spec = {
                "config": config,
                "length": length,
                "size": asdict(size),
                "device": args.device,
                "family": args.family,
            }
            started = time.monotonic()
            settings = {
                "repeats": args.repeats,
                "threads": args.threads,
                "gradient_checkpointing": args.gradient_checkpointing,
                "retain_freed_memory": args.retain_freed_memory,
            }
            result = run_worker({**spec, **settings}, args.timeout, max_rss)
            row = {**base, **result, "load_avg": round(os.getloadavg()[0], 2)}
            rows.append(row)
            wall = time.monotonic() - started
            if row["status"] == "ok":
                print(
                    f"[{done}/{total}] {config} L={length}: {row['time_s']:.3f} s fwd+bwd, "
                    f"{row['tokens_per_s']:.0f} tok/s, {row['peak_mem_mb']:.0f} MiB, "
                    f"{100 * row['matmul_util']:.1f}% matmul-FLOP util (wall {wall:.0f} s)",
                    flush=True,
                )
            else:
                print(f"[{done}/{total}] {config} L={length}: {row['status']} ({row.get('note', '')})", flush=True)
                blocked = f"{row['status']} at L={length}"
            write_outputs(rows, args.out, stem, meta, plot=False)  # a partial sweep is never lost
    paths = write_outputs(rows, args.out, stem, meta, plot=True)
    print("wrote " + ", ".join(str(path) for path in paths), flush=True)
    return csv_path


if __name__ == "__main__":
    main()
