#!/usr/bin/env bash
# The FFT-MoE experiment of docs/compose.md: 4 clients, one recipe domain each (non-IID: code, docs, prose, wiki),
# with budgets of 1, 2, 4 and 8 adapter experts per token (8 experts of width 16 beside every FFN of a frozen base),
# ROUNDS rounds of STEPS local steps. Three runs of the same jobs on the same data, steps and seed:
#   federated    the server averages each expert over the clients that trained it (weights |D_n|), routers per client
#   local-only   local_only=true: each client continues from its own adapters, nothing is averaged
#   dense FedAvg the FedAvg baseline: one dense bottleneck adapter of width 8 x 16 = 128 beside every FFN (the same
#                adapter with M = 1 expert, whose router weight is always 1), so it trains as many parameters as
#                the sparse adapters up to the routers' 7 x H per layer; every client trains all of it and the
#                server averages it by |D_n|: plain FedAvg. (A dense adapter rather than LoRA: LoRA wraps
#                nn.Linear layers, and the experts of the MoE bases here are fused 3-D tensors, so LoRA could only
#                sit on attention, not where the sparse adapters sit.)
# Each run's report (connito federated's federated_report.md) gives every client's held-out loss on every client
# domain with its own router and budget, beside the base, and the bytes each client uploaded per round.
# CPU: about ROUNDS x 4 clients x STEPS steps of the tiny base per run (minutes with the defaults).
#
#   launch/federated_experiment.sh                         # trains the quickstart first if runs/quickstart/hf is missing
#   ROUNDS=5 STEPS=100 launch/federated_experiment.sh      # longer
#   launch/federated_experiment.sh launcher.max_parallel=4 # any override goes to both runs
set -euo pipefail
CONNITO=${CONNITO:-connito}
BASE=${BASE:-runs/quickstart/hf}
ROOT=${ROOT:-runs}
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-40}
CLIENTS=${CLIENTS:-code,docs,prose,wiki}
BUDGETS=${BUDGETS:-1,2,4,8}

if [ ! -f "$BASE/config.json" ]; then
  echo "federated_experiment: no base checkpoint at $BASE; training the quickstart first"
  $CONNITO train analysis=none
fi

common=(base.path="$BASE" "clients=[$CLIENTS]" "budgets=[$BUDGETS]" adapter.num_experts=8 adapter.width=16
        rounds="$ROUNDS" client_steps="$STEPS" run.root="$ROOT")
$CONNITO federated "${common[@]}" run.name=federated "$@"
$CONNITO federated "${common[@]}" run.name=federated-local local_only=true "$@"
dense=(base.path="$BASE" "clients=[$CLIENTS]" "budgets=[$(echo "$BUDGETS" | sed 's/[0-9][0-9]*/1/g')]"
       adapter.num_experts=1 adapter.width=128 rounds="$ROUNDS" client_steps="$STEPS" run.root="$ROOT")
$CONNITO federated "${dense[@]}" run.name=federated-dense "$@"

echo "== FFT-MoE, federated (each client's own router; rows: the client models, columns: held-out domains) =="
cat "$ROOT/federated/federated_report.md"
echo "== local-only training, same jobs without averaging =="
cat "$ROOT/federated-local/federated_report.md"
echo "== FedAvg of a dense adapter of equal trainable parameters (every client's budget is its one expert) =="
cat "$ROOT/federated-dense/federated_report.md"
