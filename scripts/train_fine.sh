#!/usr/bin/env bash
# Reproduce engine/weights/finenet.{pt,onnx} from nothing but ../shared and the shipped CoarseNet (about
# 15 min on 2 cores): FineNet's sample sets (real frame pairs fitted by the capture pipeline, held-out videos
# apart; synthetic faces with known wrinkles), then the self-supervised run of trainers/configs/fine.toml.
# Every step skips work whose output exists, so a stopped run continues where it was.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
[ -e runs/fine_data/done ] || { $PY -m trainers.fine_data --out runs/fine_data && touch runs/fine_data/done; }
if [ ! -e runs/fine/finenet.pt ]; then
  if [ -e runs/fine/checkpoint.pt ]; then
    $PY -m trainers.train_fine --data runs/fine_data --out runs/fine --resume
  else
    $PY -m trainers.train_fine --data runs/fine_data --out runs/fine
  fi
fi
cp runs/fine/finenet.pt runs/fine/finenet.onnx engine/weights/
echo "weights written to engine/weights/ (from runs/fine)"
