#!/usr/bin/env bash
# Rebuild the shipped photo codecs (models/photo-{lo,mid,hi}/1) from ../shared/data/bsds500.
#
# One torch thread (the machine's other core is for other work), about 35 minutes on a
# shared 2-core machine: a base model (export/nets/photo.py, bmshj2018-factorized at
# N=48, M=96) trained for BASE_STEPS at lambda 0.008 on random 128x128 crops (and flips)
# of train/ + val/, then one copy per rung fine-tuned for RUNG_STEPS at its own lambda.
# test/ is used only for the progress log's validation and the exported quality figures.
# Checkpoints and the log go to runs/photo/ (git-ignored); the export replaces version 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/bsds500}
REPO=${REPO:-models}
RUNS=${RUNS:-runs/photo}
BASE_STEPS=${BASE_STEPS:-1800}
RUNG_STEPS=${RUNG_STEPS:-400}
mkdir -p "$RUNS"
"$PY" -m latentserve.export.training.photo --data "$DATA/train" --data "$DATA/val" \
    --val "$DATA/test" --out "$RUNS" --threads 1 --base-lambda 0.008 \
    --base-steps "$BASE_STEPS" --rung-steps "$RUNG_STEPS" \
    --rung photo-lo=0.003 --rung photo-mid=0.008 --rung photo-hi=0.02
for name in photo-lo photo-mid photo-hi; do
    "$PY" -m latentserve.export.publish.photo "$RUNS/$name.pt" --repo "$REPO" --name "$name" \
        --version 1 --fit "$DATA/train" --fit "$DATA/val" --val "$DATA/test" --overwrite
done
du -ch "$REPO"/photo-*/1/* | tail -n 1
