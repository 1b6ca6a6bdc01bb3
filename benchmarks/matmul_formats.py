"""Matrix-product cost of SmolLM2-135M in several compute formats on this CPU (issue #14).

For every format, builds all 30 layers' weight matrices (wq, wk, wv, wo, w1, w3, w2) and
the classifier from the same random float32 weights, then times

* decode: one token's matrix-vector products (batch 1) through all 30 layers + classifier,
* prefill: the same products for a 128-token batch,

and reports the weight bytes held in memory and the output error against a float64
reference computed from the unquantized float32 weights. Only the linear layers are
timed (no attention, norms or sampling), so "tokens/s" is an upper bound implied by
the matrix products alone.

Formats: fp32 / bf16 / fp16 (F.linear), int8 weight-only with per-row scales
(torch._weight_int8pack_mm), int4 weight-only with per-group scale+zero
(torch.ops.aten._weight_int4pack_mm_for_cpu, group 32 and 64), and torchao's
Int8WeightOnlyConfig when torchao is importable (for example
`pip install --target /tmp/torchao-probe --no-deps torchao`, then pass
`--torchao-path /tmp/torchao-probe`).

Command:
    .venv/bin/python benchmarks/matmul_formats.py --threads 2 1 \
        [--torchao-path /tmp/torchao-probe] [--json /tmp/matmul_formats.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DIM, HIDDEN, KV_DIM, VOCAB, N_LAYERS = 576, 1536, 3 * 64, 49152, 30
# (name, out_features, in_features) of one layer's matrices
LAYER_SHAPES = [
    ("wq", DIM, DIM), ("wk", KV_DIM, DIM), ("wv", KV_DIM, DIM), ("wo", DIM, DIM),
    ("w1", HIDDEN, DIM), ("w3", HIDDEN, DIM), ("w2", DIM, HIDDEN),
]
CLASSIFIER = ("classifier", VOCAB, DIM)


def all_shapes(n_layers: int) -> list[tuple[str, int, int]]:
    shapes = [(f"L{i}.{n}", o, k) for i in range(n_layers) for n, o, k in LAYER_SHAPES]
    return [*shapes, CLASSIFIER]


def make_weight(out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian weights (std 0.02, like trained small LMs) with 0.1 % outliers at 10x."""
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    mask = torch.rand(out_f, in_f, generator=gen) < 1e-3
    return torch.where(mask, w * 10.0, w)


# ---------------------------------------------------------------- formats
# A format is prepare(w_fp32) -> (state, nbytes) and run(state, x_fp32) -> y.

def _dense(dtype: torch.dtype):
    def prepare(w):
        wd = w.to(dtype).contiguous()
        return wd, wd.nbytes

    def run(wd, x):
        return F.linear(x.to(dtype), wd)
    return prepare, run


def _int8_rows(act_dtype: torch.dtype = torch.float32):
    def prepare(w):
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        scale = scale.to(act_dtype).contiguous()
        return (q, scale), q.nbytes + scale.nbytes

    def run(state, x):
        q, scale = state
        return torch._weight_int8pack_mm(x.to(act_dtype), q, scale)
    return prepare, run


def _int4_groups(group: int, act_dtype: torch.dtype):
    def prepare(w):
        out_f, in_f = w.shape
        g = w.reshape(out_f, in_f // group, group)
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        zero = lo + 8.0 * scale                      # kernel computes (q - 8) * scale + zero
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
        q = q.reshape(out_f, in_f).to(torch.int32).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        sz = torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous().to(act_dtype)
        return (packed, sz), packed.nbytes + sz.nbytes

    def run(state, x):
        packed, sz = state
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(act_dtype), packed, group, sz)
    return prepare, run


def _subclass_nbytes(t: torch.Tensor) -> int:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_subclass_nbytes(getattr(t, n)) for n in names)
    return t.untyped_storage().nbytes()


def _torchao(config_factory: Callable[[], object], act_dtype: torch.dtype):
    from torchao.quantization import quantize_

    def prepare(w):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=act_dtype)
        with torch.no_grad():
            lin.weight.copy_(w.to(act_dtype))
        quantize_(lin, config_factory())
        return lin, _subclass_nbytes(lin.weight)

    def run(lin, x):
        return lin(x.to(act_dtype))
    return prepare, run


def build_formats(want_torchao: bool) -> tuple[dict, list[str]]:
    fmts = {
        "fp32": _dense(torch.float32),
        "bf16": _dense(torch.bfloat16),
        "fp16": _dense(torch.float16),
        "int8 row (_weight_int8pack_mm, fp32 act)": _int8_rows(),
        "int4 g32 (_weight_int4pack_mm_for_cpu, fp32 act)": _int4_groups(32, torch.float32),
        "int8 row (_weight_int8pack_mm, bf16 act)": _int8_rows(torch.bfloat16),
        "int4 g32 (_weight_int4pack_mm_for_cpu, bf16 act)": _int4_groups(32, torch.bfloat16),
        "int4 g64 (_weight_int4pack_mm_for_cpu, bf16 act)": _int4_groups(64, torch.bfloat16),
    }
    notes: list[str] = []
    if not want_torchao:
        return fmts, notes
    try:
        import torchao
        from torchao.quantization import Int8WeightOnlyConfig
        v = torchao.__version__
        fmts[f"torchao {v} Int8WeightOnly (fp32)"] = _torchao(Int8WeightOnlyConfig, torch.float32)
        fmts[f"torchao {v} Int8WeightOnly (bf16)"] = _torchao(Int8WeightOnlyConfig, torch.bfloat16)
        # Int4WeightOnlyConfig has no CPU packing format in torchao 0.18 ("opaque" was
        # removed; plain/preshuffled/tile_packed_to_4d target CUDA), so it is not listed.
    except Exception as e:
        notes.append(f"torchao unavailable: {type(e).__name__}: {e}")
    return fmts, notes


# ---------------------------------------------------------------- measurement

@dataclass
class Result:
    fmt: str
    weight_bytes: int
    max_abs_err: float
    rel_err: float
    decode_ms: dict = field(default_factory=dict)    # threads -> ms per token
    prefill_ms: dict = field(default_factory=dict)   # threads -> ms per 128 tokens
    error: str = ""


def _time(fn: Callable[[], None], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def measure(name, prepare, run, shapes, args, err_idx) -> Result:
    gen = torch.Generator().manual_seed(args.seed)
    states, nbytes, errs = [], 0, []
    xgen = torch.Generator().manual_seed(args.seed + 1)
    x_err = {k: torch.randn(args.err_tokens, k, generator=xgen) for k in (DIM, HIDDEN)}
    for i, (_, o, k) in enumerate(shapes):
        w = make_weight(o, k, gen)
        st, nb = prepare(w)
        states.append(st)
        nbytes += nb
        if i in err_idx:
            ref = x_err[k].double() @ w.double().t()
            y = run(st, x_err[k]).double()
            errs.append(((y - ref).abs().max().item(), ((y - ref).norm() / ref.norm()).item()))
        del w
    res = Result(name, nbytes, max(e[0] for e in errs), max(e[1] for e in errs))

    xs1 = {k: torch.randn(1, k) for k in (DIM, HIDDEN)}
    xsp = {k: torch.randn(args.prefill, k) for k in (DIM, HIDDEN)}
    ks = [k for _, _, k in shapes]

    def step(xs):
        for st, k in zip(states, ks, strict=True):
            run(st, xs[k])

    for nt in args.threads:
        torch.set_num_threads(nt)
        res.decode_ms[nt] = _time(lambda: step(xs1), args.reps, args.warmup)
        res.prefill_ms[nt] = _time(lambda: step(xsp), args.prefill_reps, 1)
    return res


def table(results: list[Result], threads: list[int], prefill: int) -> str:
    head = ["format", "weight MB"]
    for nt in threads:
        head += [f"decode ms/tok ({nt}t)", f"tok/s ({nt}t)", f"prefill {prefill} ms ({nt}t)"]
    head += ["max abs err", "rel err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"| {r.fmt} | failed: {r.error} |")
            continue
        row = [r.fmt, f"{r.weight_bytes / 1e6:.1f}"]
        for nt in threads:
            d = r.decode_ms[nt]
            row += [f"{d:.2f}", f"{1e3 / d:.0f}", f"{r.prefill_ms[nt]:.0f}"]
        row += [f"{r.max_abs_err:.2e}", f"{r.rel_err:.2e}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--layers", type=int, default=N_LAYERS)
    ap.add_argument("--prefill", type=int, default=128, help="prefill batch (tokens)")
    ap.add_argument("--reps", type=int, default=10, help="decode repetitions (median)")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--err-tokens", type=int, default=8, help="tokens in the error check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="substrings: run only matching formats")
    ap.add_argument("--torchao-path", help="directory to prepend to sys.path for torchao")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--json", help="write results to this path")
    args = ap.parse_args()

    if args.torchao_path:
        sys.path.insert(0, args.torchao_path)
    shapes = all_shapes(args.layers)
    # error check on layer 0, the last layer and the classifier
    err_idx = set(range(len(LAYER_SHAPES))) | set(range(len(shapes) - 1 - len(LAYER_SHAPES), len(shapes)))
    fmts, notes = build_formats(not args.no_torchao)
    if args.only:
        fmts = {k: v for k, v in fmts.items() if any(s in k for s in args.only)}

    results = []
    with torch.inference_mode():
        for name, (prepare, run) in fmts.items():
            torch.set_num_threads(max(args.threads))
            try:
                r = measure(name, prepare, run, shapes, args, err_idx)
            except Exception as e:
                r = Result(name, 0, float("nan"), float("nan"), error=f"{type(e).__name__}: {str(e)[:160]}")
            results.append(r)
            print(f"done: {name}", file=sys.stderr, flush=True)

    env = (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
           f"{platform.machine()}, {platform.processor() or platform.platform()}")
    print(f"# SmolLM2-135M matrix products ({args.layers} layers + classifier), {env}\n")
    for n in notes:
        print(f"note: {n}\n")
    print(table(results, args.threads, args.prefill))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "notes": notes, "args": vars(args),
                       "results": [r.__dict__ for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
