"""The reference a masked run is checked against: the same model with each chosen expert copied into its own
``nn.Parameter`` (one per expert and fused tensor), trained alone by a plain torch loop with torch's AdamW, the
same schedule, weight decay, batches and gradient clipping, everything else frozen. No Connito mask, hook or
DeepSpeed code runs in it.

What it takes from the engine under test is only the arithmetic DeepSpeed uses around the optimizer, so that a
correct mask gives the same bits instead of a chaotic drift (Adam divides by the gradient's magnitude: a last-bit
difference in one step's clip factor becomes an update difference of ~1e-7 within a few steps):

* the data-parallel average: each rank's micro-batch losses are divided by ``grad_accum`` and their gradients
  summed, the ranks' gradients divided by the world size and summed -- after accumulation (ZeRO 0/1), or per
  micro-step (ZeRO 2 reduces every micro-step's gradients into its partition);
* the clip factor: ZeRO 0 clips by ``deepspeed.runtime.utils.clip_grad_norm_``'s expression, the norm of the
  per-tensor norms of the gradients as the engine's parameters hold them (the fused ``[E, ...]`` tensors, zero rows
  included); under expert parallelism Connito clips ZeRO 0 itself by the global norm with DeepSpeed's
  expression (:mod:`connito.parallel.grad_clip`: DeepSpeed 0.19.8 would take the mean of the ranks' own norms);
  ZeRO 1/2 clip by the norm the engine reports (``train/grad_norm``) with the ZeRO optimizer's expression. The
  reference also returns its own plain global norm of the separate gradients, so a test can check that the
  engine's norm is the norm of the trainable gradients alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from connito.data import prepare_data
from connito.data.packed import PackedSplit
from connito.experts import ExpertView
from connito.models.loading import build_model, tokenizer_token_ids
from connito.training.batches import StepSampler
from connito.training.losses import token_cross_entropy
from connito.training.schedule import warmup_cosine


@dataclass
class EngineArithmetic:
    """How the engine under test reduces and clips (see the module docstring)."""

    world: int = 1
    zero_stage: int = 0
    ep_size: int = 1
    norms: list[float] | None = None
    """ZeRO 1/2: the pre-clip norm the engine reported at each step."""
    lean: bool = True
    """The engine trains through lean slots (``callbacks.trainable.lean``, the default): in a layer that trains some
    but not all of its experts it holds the chosen experts' gradients stacked in one ``[G, ...]`` tensor per fused
    tensor (ascending expert id), registered last in the decoder layer (``model.layers.<L>.lean_experts.*``),
    instead of the fused ``[E, ...]`` tensor with zero rows."""


@dataclass
class Reference:
    states: dict[int, dict[str, torch.Tensor]]
    """Step -> the full transformers state dict after that step."""
    norms: list[float]
    """The global norm of the separate trainable gradients at each step, before clipping."""


def initial_model(cfg) -> nn.Module:
    """The model the trainer builds for ``cfg`` (same tokenizer, seed and config)."""
    tokenizer = prepare_data(cfg.data, progress=False).load_tokenizer()
    return build_model(cfg.model, len(tokenizer), cfg.train.seed, token_ids=tokenizer_token_ids(tokenizer))


def reference_run(
    cfg,
    expert_ids: list[tuple[int, int]],
    engine: EngineArithmetic,
    whole: tuple[str, ...] = (),
    dump_steps: tuple[int, ...] = (),
    freeze_after: dict | None = None,
) -> Reference:
    """Train the chosen experts as separate parameters (and the parameters named in ``whole`` as they are) for
    ``cfg.train.steps`` steps. AdamW groups as the trainer makes them: weight decay on matrices, none on vectors.
    ``freeze_after``: ``{"step": S, "experts": [[layer, expert], ...]}`` stops training those experts after step S
    (no gradient, so torch's AdamW skips them: no decay, no momentum)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks (OMP_NUM_THREADS=1): the same kernels sum in the same order
    try:
        return _run(cfg, [tuple(i) for i in expert_ids], engine, whole, set(dump_steps), freeze_after)
    finally:
        torch.set_num_threads(threads)


def _run(cfg, expert_ids, engine: EngineArithmetic, whole, dump_steps, freeze_after) -> Reference:
    model = initial_model(cfg)
    model.train()
    named = dict(model.named_parameters())
    for name, param in named.items():
        param.requires_grad_(name in whole)
    view = ExpertView(model)
    fused = {}  # fused parameter name -> (frozen base tensor, layer, {expert: separate parameter})
    for piece in view.expert_param_slices():
        chosen = sorted(e for layer, e in expert_ids if layer == piece.layer)
        if chosen:
            base = piece.param.detach()
            fused[piece.name] = (base, piece.layer, {e: nn.Parameter(base[e].clone()) for e in chosen})
    separate = [(name, layer, e, p) for name, (_, layer, experts) in fused.items() for e, p in experts.items()]
    trained = {name: named[name] for name in whole}
    every = [p for *_, p in separate] + list(trained.values())
    optim, train = cfg.optim, cfg.train
    groups = [
        {"params": [p for p in every if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in every if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps
    )
    scheduler = warmup_cosine(optimizer, optim.warmup_steps, train.steps, optim.min_lr_ratio)
    split = PackedSplit.from_dataset(prepare_data(cfg.data, progress=False).load_split("train"))
    world = engine.world
    samplers = [
        StepSampler(len(split), train.micro_batch_size, train.grad_accum, world, r, train.seed) for r in range(world)
    ]
    coef = cfg.model.aux_loss_coef if view.family.has_aux_loss else 0.0
    dropped: set[tuple[int, int]] = set()

    def loss_of(rows) -> torch.Tensor:
        tensors = {
            name: torch.stack([experts[e] if e in experts else base[e] for e in range(base.shape[0])])
            for name, (base, _, experts) in fused.items()
        }
        input_ids = split.input_ids_NT[rows]
        outputs = functional_call(model, tensors, args=(), kwargs={"input_ids": input_ids})
        loss = token_cross_entropy(outputs.logits, input_ids).mean()
        return loss + coef * outputs.aux_loss if coef > 0 else loss

    states, norms = {}, []
    for step in range(train.steps):
        live = [(name, e, p) for name, layer, e, p in separate if (layer, e) not in dropped]
        live += [(name, None, p) for name, p in trained.items()]
        live_params = [p for *_, p in live]
        grads = _average(
            [
                [torch.autograd.grad(loss_of(samplers[r].rows(step, m)) / train.grad_accum, live_params)
                 for m in range(train.grad_accum)]
                for r in range(world)
            ],
            per_micro_step=engine.zero_stage == 2,
        )  # fmt: skip
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        if optim.grad_clip > 0:
            held = _as_held(grads, live, fused, list(named), engine, view.num_experts)
            grads = _clip(grads, held, engine, step, optim.grad_clip)
        for p in every:
            p.grad = None
        for p, g in zip(live_params, grads):
            p.grad = g
        optimizer.step()
        scheduler.step()
        if freeze_after and step + 1 == freeze_after["step"]:
            dropped |= {tuple(i) for i in freeze_after["experts"]}
        if step + 1 in dump_steps:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            for name, _, e, p in separate:
                state[name][e] = p.detach()
            states[step + 1] = state
    return Reference(states, norms)


def _sum(tensors: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    out = list(tensors[0])
    for more in tensors[1:]:
        out = [a + b for a, b in zip(out, more)]
    return out


def _average(grads_RM: list[list[list[torch.Tensor]]], per_micro_step: bool) -> list[torch.Tensor]:
    """Rank r, micro-step m gradients -> the data-parallel average, in the engine's order of sums."""
    world = len(grads_RM)
    if per_micro_step:  # ZeRO 2: average each micro-step over the ranks, accumulate the averages
        return _sum(
            [_sum([[g / world for g in grads_RM[r][m]] for r in range(world)]) for m in range(len(grads_RM[0]))]
        )
    return _sum([[g / world for g in _sum(grads_RM[r])] for r in range(world)])  # accumulate on the rank, then average


def _lean_order(order: list[str], fused, num_experts: int) -> list[str]:
    """The engine's parameter order with lean slots: each partly trained layer's fused expert names move to the end
    of their decoder layer's parameters (where ``<layer>.lean_experts`` is registered)."""
    lean = [n for n, (_, _, experts) in fused.items() if len(experts) < num_experts]
    out = [n for n in order if n not in lean]
    for name in lean:
        layer_prefix = ".".join(name.split(".")[:3]) + "."
        last = max(i for i, n in enumerate(out) if n.startswith(layer_prefix))
        out.insert(last + 1, name)
    return out


def _as_held(grads, live, fused, order: list[str], engine: EngineArithmetic, num_experts: int):
    """Per rank, the gradients as the engine's parameters hold them, in module order: the fused ``[E, ...]``
    tensors (zero rows included; a tensor whose experts all stopped still counts), the whole parameters; under
    expert parallelism each rank's shard, ``gate_up_proj`` split into AutoEP's ``w1``/``w3``. With lean slots
    (ep 1), a partly trained layer's tensors are the chosen experts' gradients stacked (zeros for a dropped one)."""
    by_name: dict[str, dict] = {}
    for g, (name, e, _) in zip(grads, live):
        by_name.setdefault(name, {})[e] = g
    if engine.lean and engine.ep_size == 1:
        tensors = []
        for name in _lean_order(order, fused, num_experts):
            if name in fused and len(fused[name][2]) < num_experts:
                got = by_name.get(name, {})
                tensors.append(torch.stack([got.get(e, torch.zeros_like(p)) for e, p in fused[name][2].items()]))
            elif name in fused:
                full = torch.zeros_like(fused[name][0])
                for e, g in by_name.get(name, {}).items():
                    full[e] = g
                tensors.append(full)
            elif name in by_name:
                tensors.append(by_name[name][None])
        return [tensors] * engine.world
    local = num_experts // engine.ep_size
    out = []
    for rank in range(engine.world):
        owner, tensors = rank % engine.ep_size, []
        for name in order:
            if name in fused:
                full = torch.zeros_like(fused[name][0])
                for e, g in by_name.get(name, {}).items():
                    full[e] = g
                if engine.ep_size == 1:
                    tensors.append(full)
                    continue
                shard = full[owner * local : (owner + 1) * local]
                if name.endswith("gate_up_proj"):
                    width = shard.shape[1] // 2
                    tensors += [shard[:, :width], shard[:, width:]]
                else:
                    tensors.append(shard)
            elif name in by_name:
                tensors.append(by_name[name][None])
        out.append(tensors)
    return out


def _clip(grads, held, engine: EngineArithmetic, step: int, max_norm: float):
    if engine.zero_stage in (1, 2):
        norm = torch.tensor(engine.norms[step], dtype=torch.float32)
        clip = torch.clamp(((norm / 1.0) + 1e-6) / max_norm, min=1.0)
        return [g * (1.0 / clip) for g in grads]
    if engine.ep_size > 1:  # ZeRO 0 under expert parallelism: Connito clips by the global norm itself
        total = torch.stack([g.float().pow(2).sum() for g in grads]).sum().sqrt()
        clip_coef = max_norm / (total + 1e-6)
        return [g * clip_coef for g in grads] if clip_coef < 1 else grads
    # ZeRO 0 (deepspeed.runtime.utils.clip_grad_norm_): each rank's norm of per-tensor norms, averaged over ranks.
    total = None
    for tensors in held:
        norm = torch.stack([t.float().norm(2.0) for t in tensors]).pow(2.0).sum().float().pow(1.0 / 2)
        norm = norm * 1.0 / float(engine.world)
        total = norm if total is None else total + norm
    clip_coef = torch.min(torch.tensor([1.0]), torch.tensor([float(max_norm)]) / (total + 1e-6))
    return [g * clip_coef for g in grads]
