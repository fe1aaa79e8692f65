#!/usr/bin/env python
"""Forward+backward throughput of ONE MoE layer, several implementations side by side.

Implementations (all share the same router and expert weights, so they compute the same function
up to capacity drops):

* ``hf-eager``       transformers ``OlmoeSparseMoeBlock``, ``config._experts_implementation="eager"``
                     (python loop over the experts that got tokens).
* ``hf-grouped_mm``  same block, ``"grouped_mm"`` (sort by expert + ``torch.nn.functional.grouped_mm``);
                     this is what ``from_pretrained`` picks by default when it can.
* ``hf-batched_mm``  same block, ``"batched_mm"`` (gathers one weight copy per token-expert pair:
                     skipped when that gather would exceed ``--batched-mm-max-gib``).
* ``autoep-*``       DeepSpeed AutoEP ``AutoEPMoELayer`` at ep_size 1, built by ``deepspeed.initialize`` from
                     the transformers block (``expert_parallel`` config, mixtral preset with
                     ``num_experts_attr="num_experts"``: OLMoE has no preset of its own).
                     ``autoep-grouped_mm`` is its default (``torch._grouped_mm``), ``autoep-grouped_mm-fused``
                     uses ``gate_up_impl="fused"``, ``autoep-loop`` is ``use_grouped_mm=False``.
* ``ds-moe-cf1`` / ``ds-moe-cf2``  classic ``deepspeed.moe.layer.MoE`` (capacity-based top-k gate,
                     ``drop_tokens=True``) at capacity factor 1.0 / 2.0 with a SwiGLU expert of the same shape.
                     Capacity per expert is ``ceil(tokens * top_k / experts * capacity_factor)``.
* ``connito-lean-all`` / ``connito-lean-22pct``  the same transformers block on Connito's lean experts
                     (:mod:`connito.experts.lean`, ``_experts_implementation="connito_lean"``): the fused tensors
                     frozen and every expert (``-all``), or a seeded 22 % of them (``-22pct``, an ESFT-sized
                     selection), trainable as compact slots; the backward computes weight gradients for the slots'
                     experts only (``kernels/``). ``-all`` is the lean path's worst case (with every expert
                     trainable the trainer does not install slots at all: it runs ``hf-grouped_mm``).
* ``dense``          a SwiGLU MLP of width ``top_k * expert_ffn`` on every token: same active FLOPs as the
                     experts (minus the router), no routing: the practical ceiling.

Timing: ``--warmup`` untimed iterations, then the median of ``--iters`` timed iterations
(``time.perf_counter``) of forward + backward (gradient w.r.t. the input and all parameters, upstream
gradient a fixed random tensor). ``saved MiB`` is the size of the distinct tensors autograd saves for
backward in one forward (parameters excluded): an implementation-specific activation-memory figure.
Process-wide peak RSS is printed once at the end (it is not per implementation).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import resource
import statistics
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ALL_IMPLS = [
    "dense",
    "hf-eager",
    "hf-grouped_mm",
    "hf-batched_mm",
    "autoep-grouped_mm",
    "autoep-grouped_mm-fused",
    "autoep-loop",
    "ds-moe-cf1",
    "ds-moe-cf2",
    "connito-lean-all",
    "connito-lean-22pct",
]

QUICK = dict(hidden=128, experts=16, top_k=4, ffn=64, tokens=512, warmup=1, iters=3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="model hidden size (default 512)")
    p.add_argument("--experts", type=int, default=64, help="number of routed experts (default 64)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token (default 8)")
    p.add_argument("--ffn", type=int, default=256, help="expert FFN (intermediate) size (default 256)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per iteration (batch*seq) (default 8192)")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length; batch = tokens / seq-len")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per implementation (default 2)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per implementation (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all usable cores)")
    p.add_argument("--impls", default=",".join(ALL_IMPLS), help=f"comma list out of {','.join(ALL_IMPLS)}")
    p.add_argument(
        "--batched-mm-max-gib",
        type=float,
        default=4.0,
        help="skip hf-batched_mm when its per-pair weight gather would exceed this (default 4 GiB)",
    )
    p.add_argument("--router-std", type=float, default=0.02, help="router init std (OLMoE initializer_range)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the output parity check against hf-eager")
    p.add_argument("--quick", action="store_true", help=f"small smoke shape: {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        args.seq_len = min(args.seq_len, args.tokens)
    if args.tokens % args.seq_len:
        args.seq_len = args.tokens
    unknown = set(args.impls.split(",")) - set(ALL_IMPLS)
    if unknown:
        p.error(f"unknown impls {sorted(unknown)}")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return args


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases: the OLMoE expert MLP and the dense ceiling."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def olmoe_config(args, experts_implementation):
    from transformers.models.olmoe.configuration_olmoe import OlmoeConfig

    cfg = OlmoeConfig(
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_hidden_layers=1,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        vocab_size=50304,
        hidden_act="silu",
        # Renormalised top-k weights (OLMoE-1B-7B ships False): the classic DeepSpeed gate always
        # renormalises, so with True every implementation computes the same function and the parity
        # column below checks it. Costs one division per token.
        norm_topk_prob=True,
    )
    cfg._experts_implementation = experts_implementation
    return cfg


def make_reference_block(args, dtype):
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    torch.manual_seed(args.seed)
    block = OlmoeSparseMoeBlock(olmoe_config(args, "eager"))
    with torch.no_grad():
        nn.init.normal_(block.gate.weight, std=args.router_std)
        # Kaiming-uniform-like scale, as nn.Linear would give each expert.
        nn.init.uniform_(block.experts.gate_up_proj, -1 / math.sqrt(args.hidden), 1 / math.sqrt(args.hidden))
        nn.init.uniform_(block.experts.down_proj, -1 / math.sqrt(args.ffn), 1 / math.sqrt(args.ffn))
    return block.to(dtype)


def hf_block(ref, args, impl):
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    cfg = olmoe_config(args, impl)
    block = OlmoeSparseMoeBlock(cfg).to(ref.gate.weight.dtype)
    block.load_state_dict(ref.state_dict())
    assert block.experts.config._experts_implementation == impl
    return block


_DIST_READY = False


def ensure_dist():
    global _DIST_READY
    if _DIST_READY:
        return
    import socket

    import deepspeed

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    _DIST_READY = True


class _Layer(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp


class _Wrapper(nn.Module):
    """Just enough of a transformers model for AutoEP: ``model.layers.N.mlp`` and ``.config``."""

    def __init__(self, block, config):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Layer(block)])


def autoep_layer(ref, args, variant):
    """Build AutoEP's replacement layer the way training does: deepspeed.initialize + expert_parallel."""
    import deepspeed

    ensure_dist()
    block = copy.deepcopy(ref)
    wrapper = _Wrapper(block, block.experts.config)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "expert_parallel": {
            "enabled": True,
            "autoep_size": 1,
            "preset_model": "mixtral",  # OLMoE's block has the same gate/experts layout
            "num_experts_attr": "num_experts",
            "route_norm": True,  # = norm_topk_prob above
            "use_grouped_mm": variant != "autoep-loop",
            "gate_up_impl": "fused" if variant == "autoep-grouped_mm-fused" else "separate",
        },
    }
    if args.dtype == "bf16":
        ds_config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=wrapper, config=ds_config, model_parameters=wrapper.parameters())
    layer = engine.module.model.layers[0].mlp
    assert type(layer).__name__ == "AutoEPMoELayer", type(layer)
    return layer


def classic_moe(ref, args, capacity_factor):
    from deepspeed.moe.layer import MoE

    ensure_dist()
    H, Fd, E = args.hidden, args.ffn, args.experts
    expert = SwiGLU(H, Fd)
    moe = MoE(
        hidden_size=H,
        expert=expert,
        num_experts=E,
        ep_size=1,
        k=args.top_k,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        min_capacity=4,
        drop_tokens=True,
    )
    moe.set_deepspeed_parallelism()
    dtype = ref.gate.weight.dtype
    moe = moe.to(dtype)
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(ref.gate.weight)
        gu, dn = ref.experts.gate_up_proj, ref.experts.down_proj  # [E, 2F, H], [E, H, F]
        for e, ex in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            ex.gate.weight.copy_(gu[e, :Fd])
            ex.up.weight.copy_(gu[e, Fd:])
            ex.down.weight.copy_(dn[e])
    return moe


class ClassicWrapper(nn.Module):
    """Return only the hidden states; remember the drop fraction of the last forward."""

    def __init__(self, moe, args):
        super().__init__()
        self.moe = moe
        self.top_k = args.top_k
        self.last_drop = float("nan")
        self.capacity = None

    def forward(self, x):
        out, _l_aux, exp_counts = self.moe(x)
        with torch.no_grad():
            T = x.numel() // x.shape[-1]
            E = exp_counts.numel()
            cf = self.moe.deepspeed_moe.gate.capacity_factor
            cap = max(math.ceil(T / E * cf * self.top_k), self.moe.deepspeed_moe.gate.min_capacity)
            self.capacity = cap
            dropped = (exp_counts.float() - cap).clamp(min=0).sum().item()
            self.last_drop = dropped / (T * self.top_k)
        return out


def lean_block(ref, args, fraction):
    from connito.experts.lean import (
        LeanSlots,
        forward,  # noqa: F401  (registers the connito_lean experts implementation)
    )

    block = hf_block(ref, args, "connito_lean")
    experts = block.experts
    chosen = torch.randperm(args.experts, generator=torch.Generator().manual_seed(args.seed))
    chosen = sorted(chosen[: max(1, round(fraction * args.experts))].tolist())
    with torch.no_grad():
        slots = LeanSlots(0, range(args.experts), chosen, chosen, experts.gate_up_proj[chosen].clone(),
                          experts.down_proj[chosen].clone())  # fmt: skip
    experts.gate_up_proj.requires_grad_(False)
    experts.down_proj.requires_grad_(False)
    block.add_module("lean_experts", slots)
    slots.bind(experts, {"gate_up_proj": experts.gate_up_proj, "down_proj": experts.down_proj})
    return block


def build(impl, ref, args, dtype):
    H = args.hidden
    if impl == "dense":
        torch.manual_seed(args.seed + 1)
        return SwiGLU(H, args.top_k * args.ffn).to(dtype)
    if impl.startswith("hf-"):
        return hf_block(ref, args, impl[3:])
    if impl.startswith("autoep-"):
        return autoep_layer(ref, args, impl)
    if impl == "connito-lean-all":
        return lean_block(ref, args, 1.0)
    if impl == "connito-lean-22pct":
        return lean_block(ref, args, 0.22)
    if impl.startswith("ds-moe-cf"):
        return ClassicWrapper(classic_moe(ref, args, float(impl[len("ds-moe-cf") :])), args)
    raise ValueError(impl)


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def saved_activation_mib(module, x):
    """MiB of distinct storages autograd saves for backward in one forward, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in param_storages and ptr != x.untyped_storage().data_ptr():
                seen[ptr] = st.nbytes()
        except Exception:  # noqa: BLE001 - e.g. tensors without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = _out(module(x))
    del y
    return sum(seen.values()) / 2**20


def time_impl(module, x, grad, args):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        y = _out(module(x))
        t1 = time.perf_counter()
        y.backward(grad)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    for _ in range(args.warmup):
        step()
    fwd, bwd, tot = [], [], []
    for _ in range(args.iters):
        f, b = step()
        fwd.append(f)
        bwd.append(b)
        tot.append(f + b)
    return statistics.median(tot), statistics.median(fwd), statistics.median(bwd), tot


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    impls = args.impls.split(",")

    import deepspeed
    import transformers

    T, H = args.tokens, args.hidden
    batch = T // args.seq_len
    print(f"# MoE layer fwd+bwd benchmark  ({datetime.datetime.now().isoformat(timespec='seconds')})")
    print(
        f"shape: hidden={H} experts={args.experts} top_k={args.top_k} expert_ffn={args.ffn} "
        f"tokens={T} (batch {batch} x seq {args.seq_len}) dtype={args.dtype}"
    )
    print(
        f"dense ceiling: SwiGLU width {args.top_k * args.ffn}; warmup={args.warmup} iters={args.iters} "
        f"threads={args.threads}"
    )
    print(
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, loadavg {os.getloadavg()[0]:.2f}"
    )
    sys.stdout.flush()

    ref = make_reference_block(args, dtype)
    torch.manual_seed(args.seed + 2)
    x0 = torch.randn(batch, args.seq_len, H, dtype=dtype)
    grad = torch.randn(batch, args.seq_len, H, dtype=dtype)
    with torch.no_grad():
        y_ref = ref(x0) if not args.no_check else None

    rows = []
    for impl in impls:
        note = ""
        if impl == "hf-batched_mm":
            gib = T * args.top_k * 3 * args.ffn * H * x0.element_size() / 2**30
            if gib > args.batched_mm_max_gib:
                rows.append(
                    dict(
                        impl=impl,
                        skipped=f"skipped: gathers {gib:.0f} GiB of per-pair expert weights "
                        f"(> --batched-mm-max-gib {args.batched_mm_max_gib:g})",
                    )
                )
                print(f"[{impl}] {rows[-1]['skipped']}", flush=True)
                continue
        try:
            module = build(impl, ref, args, dtype)
            module.train()
            x = x0.clone().requires_grad_(True)
            diff = float("nan")
            if y_ref is not None and impl != "dense":
                with torch.no_grad():
                    diff = (_out(module(x0)).float() - y_ref.float()).abs().max().item()
            mib = saved_activation_mib(module, x)
            med, fwd, bwd, all_t = time_impl(module, x, grad, args)
        except Exception as e:  # noqa: BLE001 - report and carry on with the others
            rows.append(dict(impl=impl, skipped=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"))
            print(f"[{impl}] {rows[-1]['skipped']}", flush=True)
            continue
        if isinstance(module, ClassicWrapper):
            note = f"capacity {module.capacity}/expert, dropped {100 * module.last_drop:.2f}% of routes"
        rows.append(
            dict(
                impl=impl,
                ms=med * 1e3,
                fwd=fwd * 1e3,
                bwd=bwd * 1e3,
                tps=T / med,
                diff=diff,
                mib=mib,
                note=note,
                spread=(min(all_t) * 1e3, max(all_t) * 1e3),
            )
        )
        print(
            f"[{impl}] {med * 1e3:.1f} ms/iter (min {min(all_t) * 1e3:.1f}, max {max(all_t) * 1e3:.1f}) {note}",
            flush=True,
        )
        del module, x

    dense = next((r for r in rows if r["impl"] == "dense" and "ms" in r), None)
    print()
    print(
        "| implementation | ms/iter (fwd+bwd) | min ms | fwd ms | bwd ms | tokens/s | vs dense ceiling | saved MiB "
        "| max abs diff vs hf-eager | notes |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['impl']} | - | - | - | - | - | - | - | - | {r['skipped']} |")
            continue
        ratio = f"{dense['ms'] / r['ms']:.2f}x" if dense else "-"
        diff = "-" if math.isnan(r["diff"]) else f"{r['diff']:.1e}"
        timings = f"{r['ms']:.1f} | {r['spread'][0]:.1f} | {r['fwd']:.1f} | {r['bwd']:.1f} | {r['tps']:,.0f}"
        print(f"| {r['impl']} | {timings} | {ratio} | {r['mib']:.0f} | {diff} | {r['note']} |")
    print()
    print("ms/iter, fwd ms, bwd ms: medians; min ms: fastest timed iteration (less sensitive to other load).")
    print("vs dense ceiling = dense ms / impl ms (1.00x = as fast as a dense MLP with the same active FLOPs).")
    print("max abs diff vs hf-eager: same weights and inputs; nonzero for ds-moe-* where routes were dropped.")
    print(
        f"peak RSS of the whole process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
        f"(process-wide, not per implementation); loadavg at end {os.getloadavg()[0]:.2f}"
    )
    return rows


if __name__ == "__main__":
    main()
