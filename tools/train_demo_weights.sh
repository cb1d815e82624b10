#!/usr/bin/env bash
# How the shipped demo weights (bundles/{vqgan,lmnet,linet}/models/model.pt) are made: a ground-truth
# phantom training set, then the three `cpu` presets trained on it. Run from the repository root.
#
#   tools/train_demo_weights.sh dataset        # runs/phantom_train (64 cases, seed 0)
#   tools/train_demo_weights.sh vqgan          # runs/train_vqgan   } independent: run side by side
#   tools/train_demo_weights.sh lmnet          # runs/train_lmnet   }
#   tools/train_demo_weights.sh linet          # runs/train_linet   (needs runs/train_vqgan/model.pt)
#   tools/train_demo_weights.sh real           # runs/corpus (fetch-data: the one step that downloads), runs/real_dataset,
#                                              # runs/combined/datalist.json (phantom + real-CT training cases)
#   tools/train_demo_weights.sh finetune_real  # LMNet, VQ-GAN, then LINet fine-tuned on runs/combined (the shipped weights)
#   tools/train_demo_weights.sh ship           # copies each model.pt into bundles/<stage>/models/
#   tools/train_demo_weights.sh check          # held-out checks: VQ-GAN reconstruction (runs/eval_vqgan), 33 synthesis requests evaluated
#                                              # (benchmarks/results/heldout_evaluation), LINet's density response (benchmarks/results/linet_density.md)
#
# Iterations: the VQ-GAN's four runs as listed below (800 + 1500 + 8000 + 4100), LMNET_EPOCHS x 50,
# LINET_EPOCHS x 100 (environment variables; the defaults are the counts the shipped weights were
# trained for, see each bundles/<stage>/models/README.md).
# Crops are smaller than the presets' (same networks): on a shared 2-core CPU that is what made a few
# hundred iterations fit in the time there was. One torch thread per run (OMP_NUM_THREADS=1).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
DATA="$ROOT/runs/phantom_train"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"

train() {  # train STAGE RUN [overrides...]: the bundle's train.json, cpu preset, output in runs/RUN
    local stage="$1" run="$2"; shift 2
    cd "$ROOT/bundles/$stage"
    "$PY" -m monai.bundle run --config_file configs/train.json --meta_file configs/metadata.json \
        --logging_file configs/logging.conf --bundle_root "$ROOT/bundles/$stage" \
        --datalist "$DATA/datalist.json" --output_dir "$ROOT/runs/$run" --preset cpu "$@"
}

case "${1:-}" in
    dataset) "$ROOT/.venv/bin/lesiondiffusion" make-dataset --n 64 --out "$DATA" --seed 0 --val_fraction 0.125 ;;
    vqgan)  # four runs, each fine-tuning the one before (new optimiser, new discriminator, adversarial term from the start)
        V=(--crop_size "[32,32,32]" --iter_num 100 --num_workers 0 --progress false)
        train vqgan train_vqgan_1 "${V[@]}" --max_epochs 8 --save_every 25 --log_every 25
        train vqgan train_vqgan_2 "${V[@]}" --max_epochs 15 --save_every 25 --log_every 25 --adv_start 0 \
            --finetune_from "$ROOT/runs/train_vqgan_1/model.pt"
        train vqgan train_vqgan_3 "${V[@]}" --max_epochs 80 --save_every 100 --log_every 100 --adv_start 0 --seed 1 \
            --finetune_from "$ROOT/runs/train_vqgan_2/model.pt"
        train vqgan train_vqgan "${V[@]}" --max_epochs 41 --save_every 100 --log_every 100 --adv_start 0 --seed 2 --lr 0.0001 \
            --finetune_from "$ROOT/runs/train_vqgan_3/model.pt" ;;
    lmnet) train lmnet train_lmnet --crop_size "[32,32,16]" --iter_num 50 --max_epochs "${LMNET_EPOCHS:-20}" --num_workers 0 --save_every 25 ;;
    linet) train linet train_linet --vqgan_weights "$ROOT/runs/train_vqgan/model.pt" --crop_size "[48,48,48]" \
               --iter_num 100 --max_epochs "${LINET_EPOCHS:-100}" --num_workers 0 --save_every 100 --log_every 100 ;;
    real)
        "$ROOT/.venv/bin/lesiondiffusion" fetch-data --out "$ROOT/runs/corpus" --overwrite
        "$ROOT/.venv/bin/lesiondiffusion" make-dataset --source real --corpus "$ROOT/runs/corpus" --out "$ROOT/runs/real_dataset" \
            --val_scans ts_abdomen,pyrad_lung2 --lesions_per_scan 6 --requests_per_scan 9 --overwrite
        "$PY" - "$ROOT" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1]) / "runs"
out = {"organ_seg_version": "v1", "training": [], "validation": []}
for name in ("phantom_train", "real_dataset"):
    d = json.loads((root / name / "datalist.json").read_text())
    for split in ("training", "validation"):
        out[split] += [{k: str((root / name / v).resolve()) for k, v in e.items()} for e in d.get(split, [])]
(root / "combined").mkdir(exist_ok=True)
(root / "combined" / "datalist.json").write_text(json.dumps(out, indent=1))
PY
        ;;
    finetune_real)  # from the phantom-trained weights: LMNet 700 phantom iterations (signed-distance target) + 500 here
        train lmnet train_lmnet_sdf --crop "[32,32,16]" --iter_num 50 --max_epochs 14 --num_workers 0 --save_every 25
        DATA="$ROOT/runs/combined"
        train lmnet train_lmnet_real --iter_num 50 --max_epochs 10 --num_workers 0 --save_every 25 \
            --finetune_from "$ROOT/runs/train_lmnet_sdf/model.pt"
        train vqgan train_vqgan_real --crop_size "[32,32,32]" --iter_num 100 --max_epochs 20 --num_workers 0 --progress false \
            --adv_start 0 --lr 0.0001 --seed 3 --save_every 100 --log_every 100 --finetune_from "$ROOT/runs/train_vqgan/model.pt"
        train linet train_linet_real --vqgan_weights "$ROOT/runs/train_vqgan_real/model.pt" --crop_size "[48,48,48]" \
            --iter_num 100 --max_epochs 20 --num_workers 0 --save_every 100 --log_every 100 \
            --finetune_from "$ROOT/runs/train_linet/model.pt" ;;
    ship) for stage in vqgan lmnet linet; do
              mkdir -p "$ROOT/bundles/$stage/models"
              run="$ROOT/runs/train_${stage}_real"; [ -f "$run/model.pt" ] || run="$ROOT/runs/train_$stage"
              cp "$run/model.pt" "$ROOT/bundles/$stage/models/model.pt"
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
            --requests "$ROOT/runs/heldout_requests/requests.json" --out "$ROOT/benchmarks/results/heldout_evaluation"
        # LINet alone on the validation phantoms' true masks: density response per guidance scale
        (cd "$ROOT" && "$PY" benchmarks/linet_density.py --weights bundles/linet/models/model.pt \
            --vqgan_weights bundles/vqgan/models/model.pt --datalist runs/phantom_train/datalist.json --cases 8 --guidance 1.0,2.0) ;;
    *) echo "usage: $0 dataset|vqgan|lmnet|linet|real|finetune_real|ship|check" >&2; exit 2 ;;
esac
