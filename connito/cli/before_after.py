"""What the commands that write a smaller or restructured checkpoint (``connito prune``, ``merge``, ``share``) end
with: the held-out loss of every domain before and after, and ``<name>_report.json`` / ``.md`` beside the new
checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from connito.retirement.records import MergeReport, PruneReport, ShareReport


def write_before_after_report(
    name: str,
    checkpoint: str,
    out: Path,
    label: str,
    record: PruneReport | MergeReport | ShareReport,
    text: list[str],
    data,
    eval_tokens: int,
) -> None:
    """Measure ``checkpoint`` ("original") and ``out`` (``label``) on ``eval_tokens`` held-out tokens of every domain
    of ``data`` (0: do not measure), add the numbers to ``record`` (its ``validation_loss``) and the table to
    ``text``, write ``out/<name>_report.json`` and ``.md`` and print the table and where the report is."""
    from connito.analysis.held_out import checkpoint_losses, held_out_batches, losses_table

    if eval_tokens > 0:
        domains = list(data.domains)  # every domain: what a workload-specific change costs the others too
        held_out = held_out_batches(data, checkpoint, domains=domains, eval_tokens=eval_tokens * len(domains))
        rows = {"original": checkpoint_losses(checkpoint, held_out), label: checkpoint_losses(out, held_out)}
        record = replace(record, validation_loss=rows)
        table = losses_table(rows, [*held_out.domains, "all"])
        text += ["", "Held-out loss per domain (nats):", "", table]
        print(table)
    record.save(out / f"{name}_report.json")
    (out / f"{name}_report.md").write_text("\n".join(text) + "\n")
    print(f"written:    {out} (report: {out / f'{name}_report.md'})")
