#!/usr/bin/env bash
# The composition experiment of docs/compose.md: BTX, BAM (without and with key/value sharing) and BTS on the BTX preset's seed
# and branches (trained once; each later variant reruns only merge, fine-tuning and report), against the
# step-matched dense baseline. Prints each variant's held-out loss table, then parameters and training speed.
# CPU: ~16 min for the first pipeline, ~2-3 min per later variant.
#
#   launch/compose_experiment.sh                    # under runs/compose
#   ROOT=/scratch launch/compose_experiment.sh finetune.steps=200   # any override goes to every variant
set -euo pipefail
CONNITO=${CONNITO:-connito}
PYTHON=${PYTHON:-python}
ROOT=${ROOT:-runs}
RUN=$ROOT/compose
variants=(
  "btx|"
  "bam|mix.method=bam"
  "bam-kv|mix.method=bam mix.kv_sharing=true"
  "bts|mix.method=bts finetune.train=stitches"
)
keep=()
for entry in "${variants[@]}"; do
  name=${entry%%|*}
  read -r -a options <<<"${entry#*|}"
  echo "== $name: connito btx ${options[*]} =="
  $CONNITO btx run.root="$ROOT" run.name=compose "${options[@]}" "$@"
  saved=$RUN/variants/$name
  rm -rf "$saved" && mkdir -p "$saved"
  cp "$RUN/btx_report.md" "$RUN/btx_report.json" "$RUN/finetune/metrics.jsonl" "$saved/"
  cp -r "$RUN/finetune/hf" "$saved/hf"
  keep+=("$name=$saved")
done
for name in btx bam bam-kv bts; do
  echo "== $name =="
  cat "$RUN/variants/$name/btx_report.md"
done
echo "== parameters and training speed (fine-tuning jobs; the dense baseline's own training job) =="
$PYTHON launch/compose_costs.py "${keep[@]}" "dense=$RUN/dense"
