"""What ``connito analyze`` writes: ``analysis.json`` (schema below), PNG pictures and ``report.md``.

``analysis.json``, schema ``connito.analysis/1``. Per-layer lists follow ``model.moe_layers`` (index i is decoder
layer ``moe_layers[i]``; dense layers have no entry); experts are in the checkpoint's global numbering::

    schema            "connito.analysis/1"
    model             path, fingerprint (connito.models.fingerprint), model_type, num_layers, moe_layers,
                      num_experts, top_k
    data              split, domains, tokens {domain: routed tokens}, usable {domain: bool (>= min_tokens)}
    esft              gate_score / selection_ratio {domain: [layer][expert]}; each layer's list sums to 1 (ESFT's
                      scores, normalised per layer; 0 for a domain below min_tokens). gate_score: the mean top-k
                      gate value (zero where the token did not choose the expert; analyses written before
                      2026-12-05 held router_score here)
    router_score      {domain: [layer][expert]}: the mean of the router's full score distribution (chosen or not)
    concentration     thresholds [0.5, 0.8, 0.9]; experts_needed {domain: [layer][threshold]}: the fewest experts
                      carrying that share of the layer's gate mass
    specialisation    [layer][expert]: 1 - H(p(domain | expert)) / log D (0: used alike by all domains)
    domain_experts    {domain: ExpertMask JSON}: experts with specialisation >= threshold whose top domain it is
    coactivation      [layer][i][j]: P(j in a token's top-k | i in it)
    topk_overlap      top_n; sets {domain: [layer][expert ids]}; jaccard [layer][domain][domain]
    drivers           null, or factor_up, factor_down, tokens {domain: predicted tokens}, loss {domain: nats},
                      score / importance {domain: [layer][expert]} (score = (loss_down - loss_up) / 2 nats,
                      importance = mean KL of the two perturbations)
    sufficiency       null, or tokens {domain}, loss_full / loss_top1 {domain: nats}, agreement {domain: share of
                      predicted positions whose argmax token is the same with top-1 routing}
    reweighting       null, or factor, mode, targets, boosted {domain: [[layer, expert], ...]}, loss {domain: nats
                      as routed}, loss_under {boosted domain: {measured domain: nats}}, exports {domain: path}
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from connito.analysis.record import SCHEMA, AnalysisRecord

if TYPE_CHECKING:
    from connito.analysis.run import AnalysisResult


def _floats(tensor: torch.Tensor, digits: int = 6):
    """Nested lists of rounded floats; NaN becomes None (JSON has no NaN)."""
    if tensor.dim() == 0:
        value = float(tensor)
        return None if math.isnan(value) else round(value, digits)
    return [_floats(t, digits) for t in tensor]


def analysis_record(result: AnalysisResult, view, cfg) -> dict:
    summary, drivers = result.summary, result.drivers
    domains = list(summary.domain_names)
    moe = list(summary.moe_layers)
    per_domain = lambda t_DLE: {d: _floats(t_DLE[i]) for i, d in enumerate(domains)}  # noqa: E731
    record = {
        "schema": SCHEMA,
        "model": {
            "path": str(result.model_path),
            "fingerprint": result.fingerprint,
            "model_type": view.family.model_type,
            "num_layers": view.num_layers,
            "moe_layers": moe,
            "num_experts": view.num_experts,
            "top_k": view.top_k,
        },
        "data": {
            "split": cfg.split,
            "domains": domains,
            "tokens": {d: int(summary.tokens_D[i]) for i, d in enumerate(domains)},
            "usable": {d: bool(summary.usable_D[i]) for i, d in enumerate(domains)},
        },
        "esft": {
            "gate_score": per_domain(summary.gate_score_DLE),
            "selection_ratio": per_domain(summary.selection_ratio_DLE),
        },
        "router_score": per_domain(summary.router_score_DLE),
        "concentration": {
            "thresholds": list(summary.thresholds),
            "experts_needed": {d: summary.experts_needed_DLP[i].tolist() for i, d in enumerate(domains)},
        },
        "specialisation": _floats(summary.specialisation.specialisation_LE),
        "domain_experts": {d: mask.to_dict() for d, mask in summary.domain_experts.items()},
        "coactivation": _floats(summary.conditional_LEE),
        "topk_overlap": {
            "top_n": summary.top_n,
            "sets": {
                d: [row.nonzero().flatten().tolist() for row in summary.topn_sets_DLE[i]] for i, d in enumerate(domains)
            },
            "jaccard": _floats(summary.overlap_LDD),
        },
        "drivers": None,
    }
    if drivers is not None:
        record["drivers"] = {
            "factor_up": drivers.factor_up,
            "factor_down": drivers.factor_down,
            "tokens": {d: int(drivers.tokens_D[i]) for i, d in enumerate(domains)},
            "loss": {d: _floats(drivers.loss_D[i]) for i, d in enumerate(domains)},
            "score": per_domain(drivers.score_DLE[:, moe]),
            "importance": per_domain(drivers.importance_DLE[:, moe]),
        }
    sufficiency = result.sufficiency
    record["sufficiency"] = None
    if sufficiency is not None:
        record["sufficiency"] = {
            "tokens": {d: int(sufficiency.tokens_D[i]) for i, d in enumerate(domains)},
            "loss_full": {d: _floats(sufficiency.loss_full_D[i]) for i, d in enumerate(domains)},
            "loss_top1": {d: _floats(sufficiency.loss_top1_D[i]) for i, d in enumerate(domains)},
            "agreement": {d: _floats(sufficiency.agreement_D[i]) for i, d in enumerate(domains)},
        }
    effect = result.reweighting
    record["reweighting"] = None
    if effect is not None:
        rw = cfg.reweighting
        record["reweighting"] = {
            "factor": rw.factor,
            "mode": rw.mode,
            "targets": list(rw.targets),
            "boosted": {d: [list(k) for k in sorted(effect.reweightings[i].boost)] for i, d in enumerate(domains)},
            "loss": {d: _floats(effect.loss_D[i]) for i, d in enumerate(domains)},
            "loss_under": {
                d: {m: _floats(effect.loss_RD[i, j]) for j, m in enumerate(domains)} for i, d in enumerate(domains)
            },
            "exports": {d: str(path) for d, path in result.exports.items()},
        }
    return record


def write_outputs(result: AnalysisResult, stats, view, cfg) -> None:
    out = result.out_dir
    record = analysis_record(result, view, cfg)
    AnalysisRecord.from_dict(record).save(out / "analysis.json")  # makes out_dir; an unwritable one names the fix
    pictures = draw_pictures(result, out)
    (out / "report.md").write_text(report_markdown(record, pictures))


# -- pictures ----------------------------------------------------------------------------------------------------


def draw_pictures(result: AnalysisResult, out) -> dict[str, str]:
    """PNG files by what they show: utilisation, concentration, co-activation, overlap, drivers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.summary
    domains, moe = list(summary.domain_names), list(summary.moe_layers)
    pictures = {}

    def grid(title: str, name: str, panels, xlabel: str, ylabel: str, yticks=None, cmap="viridis", center=False):
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.2), squeeze=False)
        for ax, (label, matrix) in zip(axes[0], panels):
            data = matrix.numpy()
            limit = float(abs(matrix).nan_to_num().max()) or 1.0
            image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=-limit if center else None,
                              vmax=limit if center else None)  # fmt: skip
            ax.set_title(label, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            if yticks is not None:
                ax.set_yticks(range(len(yticks)), yticks, fontsize=7)
            fig.colorbar(image, ax=ax, fraction=0.046)
        axes[0][0].set_ylabel(ylabel, fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        pictures[name.removesuffix(".png")] = name

    layer_panels = lambda t_L: [(f"layer {layer}", t_L[i]) for i, layer in enumerate(moe)]  # noqa: E731
    grid("Token-selection ratio per domain x expert (ESFT, per layer)", "utilisation.png",
         layer_panels(summary.selection_ratio_DLE.transpose(0, 1)), "expert", "domain", domains)  # fmt: skip
    grid("P(j in top-k | i in top-k)", "coactivation.png", layer_panels(summary.conditional_LEE), "expert j",
         "expert i")  # fmt: skip
    grid(f"Overlap (Jaccard) of the domains' top-{summary.top_n} experts", "overlap.png",
         layer_panels(summary.overlap_LDD), "domain", "domain", domains)  # fmt: skip

    fig, axes = plt.subplots(1, len(moe), figsize=(3.2 * len(moe) + 1, 3.0), squeeze=False)
    for ax, (i, layer) in zip(axes[0], enumerate(moe)):
        for d, name in enumerate(domains):
            shares = summary.gate_score_DLE[d, i].sort(descending=True).values.cumsum(0)
            ax.plot(range(1, len(shares) + 1), shares.numpy(), marker="o", markersize=2, label=name)
        for threshold in summary.thresholds:
            ax.axhline(threshold, color="grey", linewidth=0.5, linestyle=":")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("experts (most used first)", fontsize=8)
    axes[0][0].set_ylabel("cumulative gate mass", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Concentration: gate mass carried by the most used experts", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "concentration.png", dpi=110)
    plt.close(fig)
    pictures["concentration"] = "concentration.png"

    if result.drivers is not None:
        scores = result.drivers.score_DLE[:, moe]
        grid("Driver score (loss_down - loss_up) / 2, nats: layer x expert", "drivers.png",
             [(name, scores[d]) for d, name in enumerate(domains)], "expert", "layer", [str(x) for x in moe],
             cmap="RdBu_r", center=True)  # fmt: skip
    return pictures


# -- report.md ---------------------------------------------------------------------------------------------------


def report_markdown(record: dict, pictures: dict[str, str]) -> str:
    model, data = record["model"], record["data"]
    domains, moe = data["domains"], model["moe_layers"]
    lines = [
        "# Routing analysis",
        "",
        f"Model `{model['path']}` ({model['model_type']}, {len(moe)} MoE layers of {model['num_experts']} experts, "
        f"top-{model['top_k']}; fingerprint `{model['fingerprint'][:23]}...`), {data['split']} split: "
        + ", ".join(f"{d} {data['tokens'][d]:,} tokens" for d in domains)
        + ". Numbers are in `analysis.json` (schema `" + record["schema"] + "`).",
        "",
        "## Utilisation and concentration",
        "",
        "| domain | "
        + " | ".join(f"experts for {int(t * 100)} % of gate mass" for t in record["concentration"]["thresholds"])
        + " |",
        "|---|" + "---|" * len(record["concentration"]["thresholds"]),
    ]  # fmt: skip
    for d in domains:
        needed = torch.tensor(record["concentration"]["experts_needed"][d], dtype=torch.float64)
        lines.append(f"| {d} | " + " | ".join(f"{v:.1f}" for v in needed.mean(dim=0).tolist()) + " |")
    lines += [
        "",
        f"Averaged over the {len(moe)} MoE layers, out of {model['num_experts']} experts. "
        + _concentration_sentence(record),
        "",
        f"![utilisation]({pictures['utilisation']})",
        "",
        f"![concentration]({pictures['concentration']})",
        "",
        "## Domain experts and overlap",
        "",
        _specialisation_sentence(record),
        "",
        "| domain | domain experts (layer: experts) |",
        "|---|---|",
    ]
    for d in domains:
        experts = record["domain_experts"][d]["experts"]
        listed = "; ".join(f"{layer}: {ids}" for layer, ids in experts.items() if ids) or "none"
        lines.append(f"| {d} | {listed} |")
    jaccard = torch.tensor(record["topk_overlap"]["jaccard"], dtype=torch.float64)
    off_diagonal = jaccard[:, ~torch.eye(len(domains), dtype=torch.bool)]
    lines += [
        "",
        f"The domains' top-{record['topk_overlap']['top_n']} expert sets overlap by a mean Jaccard index of "
        f"{off_diagonal.mean():.2f} across pairs of domains and layers (1: the same experts; 0: disjoint).",
        "",
        f"![overlap]({pictures['overlap']})",
        "",
        "## Co-activation",
        "",
        _coactivation_sentence(record),
        "",
        f"![coactivation]({pictures['coactivation']})",
        "",
    ]
    drivers = record["drivers"]
    if drivers is not None:
        lines += [
            "## Driver experts",
            "",
            f"Each expert's routing weight scaled by {drivers['factor_up']} and by {drivers['factor_down']} on the "
            "tokens that chose it; score = (loss when suppressed - loss when boosted) / 2, in nats per token "
            "(positive: the domain relies on the expert).",
            "",
            "| domain | loss (nats) | strongest drivers (layer, expert: score) |",
            "|---|---|---|",
        ]
        for d in domains:
            score = torch.tensor([[v if v is not None else float("nan") for v in row] for row in drivers["score"][d]])
            flat = score.nan_to_num(float("-inf")).flatten()
            top = flat.topk(min(3, flat.numel())).indices.tolist()
            cells = ", ".join(f"({moe[i // score.shape[1]]}, {i % score.shape[1]}: {flat[i]:+.4f})" for i in top)
            loss = drivers["loss"][d]
            lines.append(f"| {d} | {'-' if loss is None else f'{loss:.4f}'} | {cells} |")
        lines += ["", f"![drivers]({pictures['drivers']})", ""]
    if record["sufficiency"] is not None:
        lines += _sufficiency_section(record)
    if record["reweighting"] is not None:
        lines += _reweighting_section(record)
    return "\n".join(lines)


def _sufficiency_section(record: dict) -> list[str]:
    suff, domains = record["sufficiency"], record["data"]["domains"]
    lines = [
        "## Single-expert sufficiency",
        "",
        f"Every token keeps only its top-1 expert (of top-{record['model']['top_k']}), weighted as the family would "
        "weight a top-1 choice; agreement is the share of predicted positions whose most likely next token stays "
        "the same.",
        "",
        "| domain | tokens | loss, all chosen experts | loss, top-1 only | increase | argmax agreement |",
        "|---|---|---|---|---|---|",
    ]
    for d in domains:
        full, top1, agree = suff["loss_full"][d], suff["loss_top1"][d], suff["agreement"][d]
        if full is None:
            lines.append(f"| {d} | 0 | - | - | - | - |")
            continue
        lines.append(f"| {d} | {suff['tokens'][d]:,} | {full:.4f} | {top1:.4f} | {top1 - full:+.4f} | {agree:.3f} |")
    known = {d: suff["agreement"][d] for d in domains if suff["agreement"][d] is not None}
    if known:
        low, high = min(known, key=known.get), max(known, key=known.get)
        lines += [
            "",
            f"Top-1 routing keeps the prediction of {known[high]:.1%} of {high}'s tokens and {known[low]:.1%} of "
            f"{low}'s: {low} depends most on its tokens' second and later experts.",
        ]
    return lines + [""]


def _reweighting_section(record: dict) -> list[str]:
    rw, domains = record["reweighting"], record["data"]["domains"]
    lines = [
        "## Reweighting",
        "",
        f"Each domain's boost ({rw['mode']}, factor {rw['factor']}) raises its {' and '.join(rw['targets'])}; the "
        "loss change is measured on the boosted domain and on the others (nats per token; negative = better).",
        "",
        "| boosted domain | experts boosted | its loss as routed | with the boost | change | mean change, other "
        "domains |",
        "|---|---|---|---|---|---|",
    ]
    for d in domains:
        boosted, base = rw["boosted"][d], rw["loss"][d]
        under = rw["loss_under"][d]
        if not boosted or base is None:
            lines.append(f"| {d} | none | {'-' if base is None else f'{base:.4f}'} | - | - | - |")
            continue
        others = [under[m] - rw["loss"][m] for m in domains if m != d and under[m] is not None]
        other = f"{sum(others) / len(others):+.4f}" if others else "-"
        listed = ", ".join(f"({layer}, {expert})" for layer, expert in boosted)
        lines.append(f"| {d} | {listed} | {base:.4f} | {under[d]:.4f} | {under[d] - base:+.4f} | {other} |")
    if rw["exports"]:
        lines += ["", "Folded exports (plain transformers checkpoints): " + ", ".join(
            f"{d}: `{path}`" for d, path in rw["exports"].items()
        )]  # fmt: skip
    return lines + [""]


def _concentration_sentence(record: dict) -> str:
    thresholds = record["concentration"]["thresholds"]
    half = thresholds.index(0.5) if 0.5 in thresholds else 0
    means = {
        d: torch.tensor(v, dtype=torch.float64)[:, half].mean().item()
        for d, v in record["concentration"]["experts_needed"].items()
        if record["data"]["usable"][d]
    }
    if not means:
        return "No domain had enough tokens to measure."
    low, high = min(means, key=means.get), max(means, key=means.get)
    return (
        f"Routing is most concentrated for {low} ({means[low]:.1f} experts carry half its gate mass) and least for "
        f"{high} ({means[high]:.1f})."
    )


def _specialisation_sentence(record: dict) -> str:
    spec = torch.tensor(record["specialisation"], dtype=torch.float64)
    count = sum(len(ids) for mask in record["domain_experts"].values() for ids in mask["experts"].values())
    return (
        f"Specialisation (1 - entropy of an expert's routing over domains / log D) ranges from {spec.min():.2f} to "
        f"{spec.max():.2f} (mean {spec.mean():.2f}); {count} experts pass the threshold as a domain's expert."
    )


def _coactivation_sentence(record: dict) -> str:
    conditional = torch.tensor(record["coactivation"], dtype=torch.float64)
    num_experts = conditional.shape[-1]
    off = conditional[:, ~torch.eye(num_experts, dtype=torch.bool)]
    layer, flat = divmod(int(off.argmax()), off.shape[1])
    i = flat // (num_experts - 1)
    j = flat % (num_experts - 1)
    j = j + (j >= i)
    moe = record["model"]["moe_layers"]
    return (
        f"The strongest pair: in layer {moe[layer]}, P(expert {j} | expert {i}) = {off.max():.2f}; the mean over "
        f"pairs is {off.mean():.2f} (independent top-{record['model']['top_k']} choice would give about "
        f"{(record['model']['top_k'] - 1) / (num_experts - 1):.2f})."
    )
