"""The per-domain validation table printed at the end of a run."""


def format_domain_table(validation: dict[str, float], unigram: dict[str, float]) -> str:
    """Markdown table: validation loss per domain beside the unigram baseline of the same data (nats/token)."""
    rows = ["| domain | validation loss | unigram loss | model / unigram |", "|---|---|---|---|"]
    names = sorted(k for k in validation if k != "all") + (["all"] if "all" in validation else [])
    for name in names:
        loss = validation[name]
        base = unigram.get(name)
        ratio = f"{loss / base:.2f}" if base else "-"
        base_text = f"{base:.3f}" if base is not None else "-"
        rows.append(f"| {name} | {loss:.3f} | {base_text} | {ratio} |")
    return "\n".join(rows)
