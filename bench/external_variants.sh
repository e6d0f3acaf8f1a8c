#!/usr/bin/env bash
# Which dermoscopy features travel? The external benchmark (bench/external.py) of one finished HAM10000
# run (default runs/ham_dx: issue 17's recipe, see README "Benchmarks") with its stack refitted on the
# same CNNs and folds but other feature sets: none, colour only, shape + colour, and all three families
# with the dermoscope border cropped before Shades of Gray. Each variant is a copy of the run
# (runs/<run>_<variant>) and writes bench/results/external_travel_<variant>.json.
#
#     bash bench/external_variants.sh [RUN]
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/ham_dx}
data=../shared/data/ham10000
declare -A families=([nofeat]="" [color]="color" [shapecolor]="shape,color" [crop]="shape,color,texture")
for variant in nofeat color shapecolor crop; do
    copy="${run}_${variant}"
    rm -rf "$copy" && mkdir -p "$copy"
    cp -r "$run/folds.parquet" "$run/cnn" "$run/manifest.json" "$run/config.json" "$copy/"
    if [ -n "${families[$variant]}" ]; then
        constancy=$([ "$variant" = crop ] && echo shades-of-gray-cropped || echo shades-of-gray)
        python cli.py features --data "$data" --run "$copy" --families "${families[$variant]}" --image-size 128 --color-constancy "$constancy"
    fi
    python bench/external.py --run "$copy" --k 5 --models small:64,small:64@1 --epochs 16 --color-constancy shades-of-gray \
        --result "external_travel_${variant}.json"
done
