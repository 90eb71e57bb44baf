#!/usr/bin/env bash
# Rebuild the shipped model zoo (models/mnist-ae-q1..q9/1, mnist-ae-q0/2 and q10/2,
# mnist-vqvae/1, mnist-vae/2) and
# examples/digits from scratch.
#
# Two training lanes run side by side, one torch thread each (2 free cores: ~45 min (the ae ladder alone took 31 min of one shared core), plus
# ~8 min for the vqvae prior retraining in lane B; then ~15 min, one thread, for the
# ae rungs' learned samplers):
#   lane A: the ae ladder mnist-ae-q0..q10 (GDN, one base and ten fine-tuned rungs:
#           scripts/ae_ladder.sh), mnist-vae
#   lane B: mnist-vqvae (VQ-VAE, a wider decoder on its frozen codes, then a longer-trained
#           PixelCNN prior on the same codes)
# Checkpoints go to runs/zoo/ (git-ignored), logs to runs/zoo/*.log. Each model is
# exported as version 1 (replacing an earlier build); models/registry.json only grows.
set -euo pipefail
cd "$(dirname "$0")/.."
# Use the project's virtual environment when latentserve is not on PATH already.
if ! command -v latentserve >/dev/null && [ -x .venv/bin/latentserve ]; then
    export PATH="$PWD/.venv/bin:$PATH"
fi

DATA=${DATA:-../shared/data/mnist}
REPO=${REPO:-models}
RUNS=${RUNS:-runs/zoo}
THREADS=${THREADS:-1}
mkdir -p "$RUNS"

train() {  # name, then train arguments
    local name=$1; shift
    echo "== train $name: $*"
    latentserve train --data "$DATA" --out "$RUNS/$name.pt" --threads "$THREADS" "$@" \
        > "$RUNS/$name.log" 2>&1 || { echo "!! training $name failed, see $RUNS/$name.log"; return 1; }
    tail -n 1 "$RUNS/$name.log"
}

lane_a() {
    DATA=$DATA RUNS=$RUNS THREADS=$THREADS scripts/ae_ladder.sh train
    train mnist-vae --family vae --hidden 64 --res-blocks 1 --latent-channels 12 --epochs 12 \
        --lr 2e-3 --vae-sigma 0.1 --seed 1
}
lane_b() {
    # VQ-VAE (K 512) and a first PixelCNN prior on the codes of the training images and
    # their 1-px shifts, then a fresh, wider decoder trained alone on the frozen codes (the
    # codes stay; the reconstructions improve), then the shipped prior retrained on those
    # same codes for longer at a higher peak lr (fewer bits, better samples).
    train mnist-vqvae-base --family vqvae --hidden 64 --res-blocks 1 --num-codes 512 \
        --code-dim 32 --epochs 8 --lr 2e-3 --seed 1 --prior-steps 1000 --prior-shifts 1 \
        --prior-embed 32 --prior-hidden 96 --prior-layers 3
    train mnist-vqvae-dec --family decoder --vqvae "$RUNS/mnist-vqvae-base.pt" \
        --decoder-hidden 128 --decoder-res-blocks 2 --prior-shifts 1 --steps 2500 --lr 2e-3 --seed 2
    train mnist-vqvae --family prior --vqvae "$RUNS/mnist-vqvae-dec.pt" --prior-steps 1800 \
        --prior-shifts 1 --prior-embed 32 --prior-hidden 96 --prior-layers 3 --lr 2e-3 --seed 1
}

lane_a & a=$!
lane_b & b=$!
status=0
wait "$a" || status=1
wait "$b" || status=1
[ "$status" = 0 ] || { echo "!! a training lane failed"; exit 1; }

latentserve export "$RUNS/mnist-vqvae.pt" --repo "$REPO" --name mnist-vqvae --version 1 --overwrite
# The ae ladder (weights stored as exact float16; it replaced the relu ladder
# mnist-ae-lo/mid/hi:1, no longer shipped), exported into a scratch repository, then each
# rung written into $REPO as version 1 (the ends q0 and q10: version 2, their sampler's
# second recipe) with the same encoder, decoder and code tables and a learned sampler
# instead of the fitted 'gmm' (scripts/ae_ladder.sh sampler).
DATA=$DATA RUNS=$RUNS scripts/ae_ladder.sh export "$RUNS/stage1" 1
DATA=$DATA RUNS=$RUNS THREADS=$THREADS scripts/ae_ladder.sh sampler "$RUNS/stage1" "$REPO" 1
rm -rf "$REPO"/mnist-ae-lo "$REPO"/mnist-ae-mid "$REPO"/mnist-ae-hi
# mnist-vae:2 = the vae (exported into a scratch repository as version 1) plus a learned
# sampling prior: a second-stage VAE trained on its encoder.onnx's posterior means of the
# training images (Dai & Wipf 2019) and a 200-component Gaussian mixture over its u
# (~5 min, one thread); encoder, decoder and code tables are the vae's own. Version 1
# (N(0, I) sampling) is no longer shipped.
latentserve export "$RUNS/mnist-vae.pt" --repo "$RUNS/stage1" --name mnist-vae --version 1 --overwrite
latentserve sampler "$RUNS/stage1/mnist-vae/1" --repo "$REPO" --name mnist-vae --version 2 \
    --data "$DATA" --threads "$THREADS" --u-dim 16 --hidden 256 --steps 8000 --mixture 200 \
    --seed 1 --overwrite --no-progress
rm -rf "$REPO/mnist-vae/1"
python -m latentserve.export.publish.examples --data "$DATA" --out examples/digits --count 64
# The sample-quality classifier of `latentserve eval` (outside the servable listing).
python scripts/train_classifier.py --data "$DATA" --out "$REPO/classifiers/mnist-classifier/1"
du -ch "$REPO"/mnist-*/[0-9]*/* | tail -n 1
