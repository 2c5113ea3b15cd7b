#!/bin/bash
# A second grounding stage from the default recipe's ground adapter (docs/default-model.md, "Recipe v10", E13/E14),
# then per-question-type image use (experiments/image_use.py) of the ground model, the shipped (instruct) model and
# the new one on 200 held-out scenes. Needs a finished `llavakit recipe configs/default/recipe.yaml` run in runs/default.
#
#   experiments/ground_stage2.sh OUT MAX_OBJECTS ATTRIBUTE...
#   E13: experiments/ground_stage2.sh runs/exp-g2 3 color shape color_of shape_of count exists position   (~45 min)
#   E14: experiments/ground_stage2.sh runs/exp-pos 1 color shape position                               (~35 min)
#
# MAX_OBJECTS 1 trains on the ground step's own 1,000 single-object scenes (and their cached features); more
# generates 1,000 new scenes of 1..MAX_OBJECTS objects (seed 12). Held-out scenes: seed 21 (single) / 22.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { echo "usage: $0 OUT MAX_OBJECTS ATTRIBUTE..." >&2; exit 2; }
E=$1; MAX=$2; shift 2
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736
W="--backgrounds plain,gradient,noise --text-prob 0.1 --chart-prob 0.05 --width 224 --height 224 --object-scale 1.8 --categories circle,square,triangle,star,cross,heart,crescent,arrow"
G=runs/default/ground
mkdir -p "$E"
if [ "$MAX" = 1 ]; then TRAIN=$G/world; VSEED=21; else
  TRAIN=$E/world; VSEED=22
  [ -d "$TRAIN" ] || .venv/bin/llavakit world --out "$TRAIN" --num-images 1000 --seed 12 --split train --min-objects 1 --max-objects "$MAX" $W
fi
[ -d "$E/val" ] || .venv/bin/llavakit world --out "$E/val" --num-images 200 --seed $VSEED --split val --min-objects 1 --max-objects "$MAX" $W
.venv/bin/python experiments/fixed_questions.py "$TRAIN" "$E/questions.json" --attributes "$@"
.venv/bin/python experiments/fixed_questions.py "$E/val" "$E/val-questions.json" --attributes "$@"
sed -e "s#$G/questions.json#$E/questions.json#" -e "s#$G/world/images#$TRAIN/images#" \
    -e "s#feature_cache: $G/features#feature_cache: $( [ "$MAX" = 1 ] && echo $G || echo "$E" )/features#" \
    -e "s#out: $G/run#out: $E/run#" -e "s#init_adapter: null#init_adapter: $G/run/adapter#" -e "s#epochs: 3#epochs: 2#" \
    $G/run/config.yaml > "$E/config.yaml"
.venv/bin/llavakit train "$E/config.yaml" > "$E/train.log" 2>&1
for m in $G/run/model runs/default/instruct/model "$E/run/model"; do
  .venv/bin/python experiments/image_use.py --model "$m" --records "$E/val-questions.json" --images "$E/val/images" \
      --json "$E/readout-$(echo "$m" | tr / -).json"
done
