#!/usr/bin/env bash
# Dev macro AUC of `bertxml train` variants on a CodiEsp warehouse (figures, not a test): one line per variant
# with the dev macro AUC after each epoch and the best. Selection only: the test split is never read here.
#
#   bash benchmarks/codiesp_sweep.sh WORKDIR OUTDIR "model.state_layers=2 model.encoder_layers=5" "train.seed=7" ...
#
# WORKDIR: a warehouse `bertxml retrain --conf conf/codiesp.yaml --workdir WORKDIR` built (its ETL, vocabulary and
# chunks are reused); each quoted argument is one variant, its `key=value` pairs passed as --set over
# conf/codiesp.yaml; "" is the recipe as it stands. Run from the repository root (../shared/data resolves there).
set -euo pipefail
workdir=$1; out=$2; shift 2
mkdir -p "$out"
for variant in "$@"; do
  tag=$(echo "${variant:-recipe}" | tr ' =.' '_-_')
  sets=()
  for kv in $variant; do sets+=(--set "$kv"); done
  .venv/bin/bertxml train --conf conf/codiesp.yaml --workdir "$workdir" "${sets[@]}" --out "$out/$tag" \
    > "$out/$tag.log" 2>&1
  epochs=$(grep -o 'dev at step [0-9]*: macro AUC [0-9.]*' "$out/$tag.log" | awk '{print $NF}' | tr '\n' ' ')
  best=$(grep -o 'dev macro AUC [0-9.]*' "$out/$tag.log" | tail -1 | awk '{print $NF}')
  echo "${variant:-recipe} | ${epochs}| best ${best}"
done
