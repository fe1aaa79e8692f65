#!/usr/bin/env bash
# The README's FFT-MoE experiment (issue 20): 4 clients, one recipe domain each (non-IID: code, docs, prose, wiki),
# with budgets of 1, 2, 4 and 8 adapter experts per token (8 experts of width 16 beside every FFN of a frozen base),
# ROUNDS rounds of STEPS local steps. Two runs of the same jobs on the same data, steps and seed:
#   federated   the server averages each expert over the clients that trained it (weights |D_n|), routers per client
#   local-only  local_only=true: each client continues from its own adapters, nothing is averaged
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

echo "== FFT-MoE, federated (each client's own router; rows: the client models, columns: held-out domains) =="
cat "$ROOT/federated/federated_report.md"
echo "== local-only training, same jobs without averaging =="
cat "$ROOT/federated-local/federated_report.md"
