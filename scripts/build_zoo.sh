#!/usr/bin/env bash
# Rebuild the shipped model zoo (models/mnist-*) and examples/digits from scratch.
#
# Two training lanes run side by side, one torch thread each (2 free cores: ~35 min, plus
# ~10 min for the vqvae's parallel prior in lane B):
#   lane A: mnist-ae-mid, mnist-ae-lo, mnist-ae-hi (a lambda ladder), mnist-vae
#   lane B: mnist-vqvae (VQ-VAE, a wider decoder on its frozen codes, exported as version 1
#           into runs/zoo/repo, then the parallel prior (code kind 4) trained on the codes
#           that version's encoder.onnx writes; shipped as mnist-vqvae version 2 with the
#           same encoder and decoder files. Version 1 is not shipped (the size budget).
# Checkpoints go to runs/zoo/ (git-ignored), logs to runs/zoo/*.log. Each model is
# exported as its shipped version (replacing an earlier build); models/registry.json only grows.
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

AE=(--family ae --hidden 64 --res-blocks 1 --latent-channels 12 --epochs 20 --lr 2e-3 --seed 1)
lane_a() {
    train mnist-ae-mid "${AE[@]}" --lambda 0.004
    train mnist-ae-lo "${AE[@]}" --lambda 0.0012
    train mnist-ae-hi "${AE[@]}" --lambda 0.016
    train mnist-vae --family vae --hidden 64 --res-blocks 1 --latent-channels 12 --epochs 12 \
        --lr 2e-3 --vae-sigma 0.1 --seed 1
}
lane_b() {
    # VQ-VAE (K 512) and a first PixelCNN prior on the codes of the training images and
    # their 1-px shifts, then a fresh, wider decoder trained alone on the frozen codes (the
    # codes stay; the reconstructions improve). That is version 1 (not shipped); version 2
    # adds the parallel prior (7 groups, one pass each) trained on version 1's own codes.
    train mnist-vqvae-base --family vqvae --hidden 64 --res-blocks 1 --num-codes 512 \
        --code-dim 32 --epochs 8 --lr 2e-3 --seed 1 --prior-steps 1000 --prior-shifts 1 \
        --prior-embed 32 --prior-hidden 96 --prior-layers 3
    train mnist-vqvae-dec --family decoder --vqvae "$RUNS/mnist-vqvae-base.pt" \
        --decoder-hidden 128 --decoder-res-blocks 2 --prior-shifts 1 --steps 2500 --lr 2e-3 --seed 2
    latentserve export "$RUNS/mnist-vqvae-dec.pt" --repo "$RUNS/repo" --name mnist-vqvae \
        --version 1 --overwrite > "$RUNS/mnist-vqvae-v1-export.log"
    train mnist-vqvae-parallel --family parallel-prior --base "$RUNS/repo/mnist-vqvae/1" \
        --steps 2000 --batch-size 128 --lr 2e-3 --seed 1 --prior-shifts 1 --prior-embed 32 --prior-hidden 64 --prior-layers 3 --prior-dropout 0.1 --prior-arch conv
}

lane_a & a=$!
lane_b & b=$!
status=0
wait "$a" || status=1
wait "$b" || status=1
[ "$status" = 0 ] || { echo "!! a training lane failed"; exit 1; }

for name in mnist-ae-lo mnist-ae-mid mnist-ae-hi mnist-vae; do
    latentserve export "$RUNS/$name.pt" --repo "$REPO" --name "$name" --version 1 --overwrite
done
python -m latentserve.export.publish.parallel --base "$RUNS/repo/mnist-vqvae/1" \
    --prior "$RUNS/mnist-vqvae-parallel.pt" --repo "$REPO" --version 2 --data "$DATA" --overwrite
python -m latentserve.export.publish.examples --data "$DATA" --out examples/digits --count 64
# The sample-quality classifier of `latentserve eval` (outside the servable listing).
python scripts/train_classifier.py --data "$DATA" --out "$REPO/classifiers/mnist-classifier/1"
du -ch "$REPO"/mnist-*/[0-9]*/* | tail -n 1
