#!/bin/bash
# E14 (docs/default-model.md, "Recipe v10"): can the LLaVA side learn position at all? The ground step's own
# 1,000 single-object scenes asked colour, shape and "Where is the shape?" (llavakit/datagen/grounding.py), 2 epochs
# from the default recipe's ground adapter; then per-question-type image use (experiments/image_use.py) of the ground
# model and this one on 200 held-out single-object scenes. Needs a finished `llavakit recipe
# configs/default/recipe.yaml` run in runs/default. Writes runs/exp-pos/. About 35 min of training on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736
W="--backgrounds plain,gradient,noise --text-prob 0.1 --chart-prob 0.05 --width 224 --height 224 --object-scale 1.8 --categories circle,square,triangle,star,cross,heart,crescent,arrow"
E=runs/exp-pos
A="color shape position"
[ -d $E/val ] || .venv/bin/llavakit world --out $E/val --num-images 200 --seed 21 --split val --min-objects 1 --max-objects 1 $W
.venv/bin/python experiments/fixed_questions.py runs/default/ground/world $E/questions.json --attributes $A
.venv/bin/python experiments/fixed_questions.py $E/val $E/val-questions.json --attributes $A
sed -e "s#runs/default/ground/questions.json#$E/questions.json#" \
    -e "s#out: runs/default/ground/run#out: $E/run#" \
    -e "s#init_adapter: null#init_adapter: runs/default/ground/run/adapter#" -e "s#epochs: 3#epochs: 2#" \
    runs/default/ground/run/config.yaml > $E/config.yaml
date; .venv/bin/llavakit train $E/config.yaml > $E/train.log 2>&1; date
.venv/bin/python experiments/image_use.py --model runs/default/ground/run/model --records $E/val-questions.json --images $E/val/images --json $E/readout-ground.json
.venv/bin/python experiments/image_use.py --model $E/run/model --records $E/val-questions.json --images $E/val/images --json $E/readout-pos.json
date
