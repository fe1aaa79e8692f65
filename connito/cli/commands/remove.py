"""``connito remove checkpoint=<dir> 'experts=[...]' out=<dir>``: a checkpoint without some experts, as checkpoint
surgery (:func:`connito.routing.opt_out.save_without_experts`): their FFN slices and router rows are gone, the
others renumbered in order, the config's expert count updated, and plain transformers loads the result. It
computes exactly what the model computes with those experts opted out at inference (``OptOut``, identical
logits); the input checkpoint is never written to."""

import re
from dataclasses import dataclass, field
from pathlib import Path

from connito.cli.command import Command

EXPERT = re.compile(r"^\s*(\*|\d+)\s*:\s*(\d+)\s*$")


@dataclass
class RemoveConfig:
    """Root config of ``connito remove``. Kept here, not beside ``save_without_experts``: importing
    ``connito.composition`` loads torch, and ``connito --help`` reads every command's config."""

    checkpoint: str = ""
    """The ``save_pretrained`` MoE checkpoint to remove experts from (required; never modified)."""
    experts: list[str] = field(default_factory=list)
    """The experts to remove: ``layer:expert`` in the global numbering (``[1:3,2:3]``), or ``*:expert`` for that
    expert of every MoE layer (``['*:3']``). Every MoE layer must lose the same number (one expert count per
    config); opting out at inference has no such limit."""
    out: str = ""
    """Where the smaller checkpoint goes (required): a new or empty directory unless ``overwrite``."""
    overwrite: bool = False
    """Replace an existing non-empty ``out`` (only once the new checkpoint is complete)."""


def parse_experts(items: list[str]):
    """``layer:expert`` ids, or ``*:expert`` (every MoE layer) items; not both kinds in one call."""
    from connito.routing.opt_out import in_every_layer

    parsed = []
    for item in items:
        match = EXPERT.match(str(item))
        if match is None:
            raise ValueError(f"experts: {item!r} is not layer:expert (e.g. 1:3) or *:expert (e.g. '*:3')")
        parsed.append((match.group(1), int(match.group(2))))
    every = [expert for layer, expert in parsed if layer == "*"]
    if every and len(every) != len(parsed):
        raise ValueError(f"experts={items}: give either layer:expert ids or *:expert items, not both")
    if every:
        return in_every_layer(*every)
    return [(int(layer), expert) for layer, expert in parsed]


def check_even(checkpoint: str, experts, given: list[str]) -> None:
    """Refuse, in the command line's terms, ``layer:expert`` ids that take more experts from some MoE layers than
    from others (a transformers config has one expert count for every layer). The layers are read from the
    checkpoint's config on the meta device: no weight is loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from connito.experts import ExpertView
    from connito.models.families import ModelError
    from connito.models.loading import validate_checkpoint_dir

    if not isinstance(experts, list):
        return  # '*:expert' items (in_every_layer): the same experts of every layer
    validate_checkpoint_dir(checkpoint, setting="checkpoint")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint, local_files_only=True))
    moe_layers = ExpertView(model).moe_layers
    per_layer = {layer: sorted({expert for at, expert in experts if at == layer}) for layer in moe_layers}
    if len({len(ids) for ids in per_layer.values()}) > 1:
        counts = ", ".join(f"layer {layer}: {len(ids)}" for layer, ids in per_layer.items())
        most = max(per_layer.values(), key=len)
        every = ",".join(f"{layer}:{expert}" for layer in moe_layers for expert in most)
        star = ",".join(f"*:{expert}" for expert in most)
        raise ModelError(
            f"experts={given} removes different numbers of experts from the MoE layers ({counts}); a checkpoint has "
            f"one expert count for every layer, so remove as many from each, e.g. 'experts=[{every}]' or "
            f"'experts=[{star}]' (that expert of every MoE layer)"
        )


def run(cfg: RemoveConfig, run_dir: Path) -> None:
    from connito.models.families import ModelError
    from connito.routing.opt_out import save_without_experts  # here, not at the top: `connito --help`

    missing = [key for key in ("checkpoint", "out") if not getattr(cfg, key)]
    if missing or not cfg.experts:
        raise ModelError(
            "connito remove needs checkpoint=<dir>, experts=[layer:expert,...] (or ['*:expert']) and out=<dir>; "
            f"missing: {', '.join([*missing, *([] if cfg.experts else ['experts'])])}"
        )
    experts = parse_experts(list(cfg.experts))
    check_even(cfg.checkpoint, experts, list(cfg.experts))
    out = save_without_experts(cfg.checkpoint, experts, cfg.out, overwrite=cfg.overwrite)
    (out / "remove_report.md").write_text(removal_report(Path(cfg.checkpoint), out))
    print(f"written:    {out} (report: {out / 'remove_report.md'}; which old expert each new one is: "
          f"{out / 'connito_opt_out.json'})")  # fmt: skip


def removal_report(source: Path, out: Path) -> str:
    """A short markdown report: experts per MoE layer before and after, the experts kept, parameters before and
    after (from the safetensors headers: nothing is loaded)."""
    import json

    from connito.models.loading import checkpoint_parameters

    provenance = json.loads((out / "connito_opt_out.json").read_text())
    kept = provenance["kept"]
    before, after = checkpoint_parameters(source), checkpoint_parameters(out)
    lines = [
        f"# {source} without {sum(len(v) for v in provenance['removed']['experts'].values())} experts",
        "",
        f"Parameters: {before:,} -> {after:,}. Kept experts per MoE layer (old ids; new ids are their positions):",
        "",
        *(f"- layer {layer}: {experts}" for layer, experts in kept.items()),
        "",
        "The checkpoint computes what the original computes with the other experts opted out (identical logits).",
        "",
    ]
    return "\n".join(lines)


COMMAND = Command(
    name="remove",
    summary="a checkpoint without some experts (surgery; identical to opting them out), loadable in transformers",
    config_name="remove",
    schema=RemoveConfig,
    run=run,
)
