#!/usr/bin/env bash
# Rebuild the model that ships in the package, from the shared training split.
# Usage: scripts/rebuild_default_model.sh [DATA_ROOT]   (default ../shared/data/chest_xray)
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data/chest_xray}"
run="runs/seed-shipped-$(date +%Y%m%d-%H%M%S)"
pneumoscan="${PNEUMOSCAN:-.venv/bin/pneumoscan}"
"$pneumoscan" train --data "$data" --arch seed --seed 42 --val-fraction 0.1 --out "$run"
cp "$run/model.keras" src/pneumoscan/assets/models/seed-res224-kermany.keras
# The out-of-distribution detector (refuses non-X-rays), fitted on the same training images.
"$pneumoscan" fit-ood --data "$data" --check "$(dirname "$data")/site_sample" \
    --out src/pneumoscan/assets/models/seed-res224-kermany.keras
echo "shipped model rebuilt from $run"
