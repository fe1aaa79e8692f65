#!/usr/bin/env bash
# The adaptation experiment of docs/adapt.md: the quickstart model adapted to one domain (code) by full fine-tuning,
# ESFT-Gate and ESFT-Token (top_p 0.2) and DES-MoE, each on the same data, steps and optimizer, then one table of
# in-domain gain, forgetting and cost (`connito adapt report`). CPU, a few minutes per method.
#
#   launch/adapt_experiment.sh                      # trains the quickstart first if runs/quickstart/hf is missing
#   launch/adapt_experiment.sh train.steps=400      # any override goes to every method
#   DOMAIN=prose launch/adapt_experiment.sh         # another recipe domain
set -euo pipefail
CONNITO=${CONNITO:-connito}
BASE=${BASE:-runs/quickstart/hf}
DOMAIN=${DOMAIN:-code}
ROOT=${ROOT:-runs}

if [ ! -f "$BASE/config.json" ]; then
  echo "adapt_experiment: no base checkpoint at $BASE; training the quickstart first"
  $CONNITO train analysis=none
fi
common=(model.path="$BASE" "data.domains=[$DOMAIN]" run.root="$ROOT")
runs=()
for method in full esft-gate esft-token des_moe; do
  name="adapt-$DOMAIN-$method"
  case $method in
    esft-*) args=(method=esft esft.score="${method#esft-}") ;;
    *) args=(method="$method") ;;
  esac
  $CONNITO adapt "${args[@]}" "${common[@]}" run.name="$name" "$@"
  runs+=("$ROOT/$name")
done
$CONNITO adapt report "runs=[$(IFS=,; echo "${runs[*]}")]"
