#!/usr/bin/env bash
# DeepSeek-V3's auxiliary-loss-free balancing on the tiny preset: the same run with the bias update (DeepSeek's rate,
# 0.001) and without it (the sequence-wise balance loss, 0.0001, in both), then each export's expert load on held-out
# text: max / mean of the experts' share of the top-k choices, per MoE layer (1.0 = perfectly balanced).
#
#   launch/balance_experiment.sh                      # 900 steps each, like the quickstart's base
#   launch/balance_experiment.sh train.steps=200      # any override goes to both runs
set -euo pipefail
CONNITO=${CONNITO:-connito}
PYTHON=${PYTHON:-python}
ROOT=${ROOT:-runs}
for rate in 0.001 0; do
  $CONNITO train model=deepseek_v3_tiny model.expert_bias_update_rate=$rate run.root="$ROOT" \
    run.name="balance-v3-rate$rate" analysis.drivers.enabled=false analysis.sufficiency.enabled=false "$@"
done
$PYTHON - "$ROOT" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
print("| run | max/mean expert load per MoE layer | mean over layers |")
print("|---|---|---|")
for rate in ("0.001", "0"):
    analysis = json.loads((root / f"balance-v3-rate{rate}" / "analysis" / "analysis.json").read_text())
    tokens = analysis["data"]["tokens"]
    ratios = analysis["esft"]["selection_ratio"]
    layers = len(next(iter(ratios.values())))
    loads = []
    for i in range(layers):
        pooled = [sum(ratios[d][i][e] * tokens[d] for d in ratios) / sum(tokens.values()) for e in range(len(ratios[next(iter(ratios))][i]))]
        loads.append(max(pooled) * len(pooled) / sum(pooled))
    name = f"bias update, rate {rate}" if rate != "0" else "no bias update"
    print(f"| {name} | {', '.join(f'{x:.2f}' for x in loads)} | {sum(loads) / len(loads):.2f} |")
PY
