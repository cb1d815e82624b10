#!/usr/bin/env bash
# How the shipped demo weights (bundles/{vqgan,lmnet,linet}/models/model.pt) are made: a ground-truth
# phantom training set, then the three `cpu` presets trained on it. Run from the repository root.
#
#   tools/train_demo_weights.sh dataset        # runs/phantom_train (64 cases, seed 0)
#   tools/train_demo_weights.sh vqgan          # runs/train_vqgan   } independent: run side by side
#   tools/train_demo_weights.sh lmnet          # runs/train_lmnet   }
#   tools/train_demo_weights.sh linet          # runs/train_linet   (needs runs/train_vqgan/model.pt)
#   tools/train_demo_weights.sh ship           # copies each model.pt into bundles/<stage>/models/
#   tools/train_demo_weights.sh check          # held-out checks: VQ-GAN reconstruction (runs/eval_vqgan), 33 synthesis requests evaluated (benchmarks/results/heldout_evaluation)
#
# Iterations: VQGAN_EPOCHS x 100, LMNET_EPOCHS x 50, LINET_EPOCHS x 50 (environment variables; the
# defaults are the counts the shipped weights were trained for, see each bundles/<stage>/models/README.md).
# Crops are smaller than the presets' (same networks): on a shared 2-core CPU that is what made a few
# hundred iterations fit in the time there was. One torch thread per run (OMP_NUM_THREADS=1).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
DATA="$ROOT/runs/phantom_train"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"

train() {  # train STAGE [overrides...]: the bundle's train.json, cpu preset, output in runs/train_STAGE
    local stage="$1"; shift
    cd "$ROOT/bundles/$stage"
    "$PY" -m monai.bundle run --config_file configs/train.json --meta_file configs/metadata.json \
        --logging_file configs/logging.conf --bundle_root "$ROOT/bundles/$stage" \
        --datalist "$DATA/datalist.json" --output_dir "$ROOT/runs/train_$stage" --preset cpu --seed 0 "$@"
}

case "${1:-}" in
    dataset) "$ROOT/.venv/bin/lesiondiffusion" make-dataset --n 64 --out "$DATA" --seed 0 --val_fraction 0.125 ;;
    vqgan) train vqgan --crop_size "[32,32,32]" --iter_num 100 --max_epochs "${VQGAN_EPOCHS:-8}" \
               --num_workers 0 --save_every 25 --log_every 25 --progress false ;;
    lmnet) train lmnet --crop "[32,32,16]" --iter_num 50 --max_epochs "${LMNET_EPOCHS:-20}" --num_workers 0 --save_every 25 ;;
    linet) train linet --vqgan_weights "$ROOT/runs/train_vqgan/model.pt" --crop_size "[48,48,48]" \
               --iter_num 50 --max_epochs "${LINET_EPOCHS:-65}" --num_workers 0 --save_every 25 --log_every 10 ;;
    ship) for stage in vqgan lmnet linet; do
              mkdir -p "$ROOT/bundles/$stage/models"
              cp "$ROOT/runs/train_$stage/model.pt" "$ROOT/bundles/$stage/models/model.pt"
          done ;;
    check)
        "$ROOT/.venv/bin/lesiondiffusion" make-dataset --n 4 --out "$ROOT/runs/phantom_heldout" --seed 100 --val_fraction 0 --overwrite
        # 33 held-out requests (11 images x hypo/iso/hyper), the chain's defaults, then the evaluation report
        "$ROOT/.venv/bin/lesiondiffusion" make-dataset --n 11 --out "$ROOT/runs/heldout_requests" --seed 1000 --requests --overwrite
        (cd "$ROOT/bundles/vqgan" && "$PY" -m monai.bundle run --config_file configs/inference.json \
            --meta_file configs/metadata.json --logging_file configs/logging.conf --bundle_root "$ROOT/bundles/vqgan" \
            --datalist "$ROOT/runs/phantom_heldout/datalist.json" --split training --output_dir "$ROOT/runs/eval_vqgan" \
            --preset cpu --progress false)
        "$ROOT/.venv/bin/lesiondiffusion" synthesize --requests "$ROOT/runs/heldout_requests/requests.json" \
            --out "$ROOT/runs/heldout_synth" --seed 0 --steps 25 --overwrite || true  # failed cases are in the report
        "$ROOT/.venv/bin/lesiondiffusion" evaluate --pred "$ROOT/runs/heldout_synth" \
            --requests "$ROOT/runs/heldout_requests/requests.json" --out "$ROOT/benchmarks/results/heldout_evaluation" ;;
    *) echo "usage: $0 dataset|vqgan|lmnet|linet|ship|check" >&2; exit 2 ;;
esac
