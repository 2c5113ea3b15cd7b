#!/bin/bash
# E13 (docs/default-model.md, "Recipe v10"): a second grounding stage on scenes of 1-3 objects (bound, count,
# existence and position questions, llavakit/datagen/grounding.py) from the default recipe's ground adapter, then
# per-question-type image use (experiments/image_use.py) of the ground model, the shipped model and this one on
# 200 held-out scenes. Needs a finished `llavakit recipe configs/default/recipe.yaml` run in runs/default.
# Writes runs/exp-g2/. About 45 min of training on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736
W="--backgrounds plain,gradient,noise --text-prob 0.1 --chart-prob 0.05 --width 224 --height 224 --object-scale 1.8 --categories circle,square,triangle,star,cross,heart,crescent,arrow"
E=runs/exp-g2
A="color shape color_of shape_of count exists position"
[ -d $E/world ] || .venv/bin/llavakit world --out $E/world --num-images 1000 --seed 12 --split train --min-objects 1 --max-objects 3 $W
[ -d $E/val ] || .venv/bin/llavakit world --out $E/val --num-images 200 --seed 22 --split val --min-objects 1 --max-objects 3 $W
.venv/bin/python experiments/fixed_questions.py $E/world $E/questions.json --attributes $A
.venv/bin/python experiments/fixed_questions.py $E/val $E/val-questions.json --attributes $A
sed -e "s#runs/default/ground/questions.json#$E/questions.json#" -e "s#runs/default/ground/world/images#$E/world/images#" \
    -e "s#runs/default/ground/features#$E/features#" -e "s#out: runs/default/ground/run#out: $E/run#" \
    -e "s#init_adapter: null#init_adapter: runs/default/ground/run/adapter#" -e "s#epochs: 3#epochs: 2#" \
    runs/default/ground/run/config.yaml > $E/config.yaml
date; .venv/bin/llavakit train $E/config.yaml > $E/train.log 2>&1; date
for m in ground/run/model instruct/model; do
  .venv/bin/python experiments/image_use.py --model runs/default/$m --records $E/val-questions.json --images $E/val/images --json $E/readout-$(echo $m | cut -d/ -f1).json
done
.venv/bin/python experiments/image_use.py --model $E/run/model --records $E/val-questions.json --images $E/val/images --json $E/readout-ground2.json
date
