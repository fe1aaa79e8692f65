#!/usr/bin/env bash
# The multi-domain experiment of docs/adapt.md (DES-MoE's claim): the quickstart model adapted to 2, then 4 domains at once
# (mixed batches) by full fine-tuning, ESFT-Gate (selected on the mixture), DES-MoE as the paper's equations set it
# (phase I: router + backbone) and DES-MoE with phase I training the router alone, each on the same data, steps and
# optimizer. Gain is measured on the adapted domains, forgetting on held-out general text (prose and wiki, never
# trained on in either setting). Two tables from `connito adapt report`. CPU, about 1 min per run.
#
#   launch/des_moe_experiment.sh                     # trains the quickstart first if runs/quickstart/hf is missing
#   launch/des_moe_experiment.sh train.steps=400     # any override goes to every run
#
# The 4-domain setting adds math (Metamath set.mm) and German (fortunes) from Debian packages:
#   apt-get install metamath-databases fortunes-de
set -euo pipefail
CONNITO=${CONNITO:-connito}
BASE=${BASE:-runs/quickstart/hf}
ROOT=${ROOT:-runs}
HELD_OUT=${HELD_OUT:-prose,wiki}
SETTINGS=${SETTINGS:-"code,docs code,docs,math,german"}

for file in /usr/share/metamath/databases/set.mm /usr/share/games/fortunes/de; do
  if [[ "$SETTINGS" == *math* || "$SETTINGS" == *german* ]] && [ ! -e "$file" ]; then
    echo "des_moe_experiment: $file is missing: apt-get install metamath-databases fortunes-de" \
      "(or SETTINGS='code,docs code,docs,prose' with HELD_OUT=wiki)" >&2
    exit 2
  fi
done
if [ ! -f "$BASE/config.json" ]; then
  echo "des_moe_experiment: no base checkpoint at $BASE; training the quickstart first"
  $CONNITO train analysis=none
fi

for domains in $SETTINGS; do
  n=$(awk -F, '{print NF}' <<<"$domains")
  common=(model.path="$BASE" "data.domains=[$domains]" "outcome.eval_domains=[$domains,$HELD_OUT]"
          "outcome.adapted_domains=[$domains]" run.root="$ROOT")
  runs=()
  for method in full esft-gate des_moe des_moe-router; do
    name="multi$n-$method"
    case $method in
      esft-gate) args=(method=esft esft.score=gate) ;;
      des_moe-router) args=(method=des_moe "+callbacks.des_moe.phase_parts=[[router],[router,experts],[experts]]") ;;
      *) args=(method="$method") ;;
    esac
    $CONNITO adapt "${args[@]}" "${common[@]}" run.name="$name" "$@"
    runs+=("$ROOT/$name")
  done
  echo "== adapted to $domains at once; forgetting on $HELD_OUT =="
  $CONNITO adapt report "runs=[$(IFS=,; echo "${runs[*]}")]"
done
