#!/usr/bin/env bash
# Reproduce engine/weights/coarsenet.{pt,onnx}, eyestate.onnx and landmark_expression.npz from nothing but
# ../shared (about 2 h on 2 cores): synthetic data (MediaPipe-tracked), real frame pairs, stage 1 (synthetic),
# stage 2 (+ real frames), stage 3 (L1 on the expression weights), stage 4 (profiles: yaw to 90 degrees,
# landmark dropout), the eye-state net on the eye patches, then the landmark-expression MLP.
# Every step skips work whose output exists, so a stopped run continues where it was.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1   # workers: one thread each
synth() {  # seed count folder [synthesis options]
  [ -e "runs/data/$3/done" ] || { $PY -m trainers.synthesis --seed "$1" --count "$2" --out "runs/data/$3" \
      --workers 2 "${@:4}" && touch "runs/data/$3/done"; }
}
synth 0 6000 synth0
synth 2 6000 synth2
synth 1 512 synth_val
synth 4 6000 synth4     # for the eye-state net only
synth 5 6000 synth5
synth 6 6000 synth6_profile --yaw-deg 90 --yaw-uniform 1 --follow-lost   # stage 4: heads turned to profile
[ -e runs/data/real_pairs/done ] || { $PY -m trainers.real_frames --out runs/data/real_pairs --pairs-per-video 300 \
    && touch runs/data/real_pairs/done; }
unset OMP_NUM_THREADS   # training sets its own thread count (train.threads)
stage() {  # config out
  if [ -e "$2/coarsenet.pt" ]; then return; fi
  if [ -e "$2/checkpoint.pt" ]; then
    $PY -m trainers.train_coarse --config "$1" --out "$2" --resume
  else
    $PY -m trainers.train_coarse --config "$1" --out "$2"
  fi
}
stage trainers/configs/coarse.toml runs/coarse_stage1
stage trainers/configs/coarse_real.toml runs/coarse_stage2
stage trainers/configs/coarse_sparse.toml runs/coarse_stage3
stage trainers/configs/coarse_profile.toml runs/coarse_stage4
cp runs/coarse_stage4/coarsenet.pt runs/coarse_stage4/coarsenet.onnx engine/weights/
echo "weights written to engine/weights/ (from runs/coarse_stage4)"
[ -e runs/eyes/eyestate.onnx ] || $PY -m trainers.train_eyes --data runs/data/synth0 runs/data/synth2 \
    runs/data/synth4 runs/data/synth5 --val runs/data/synth_val --out runs/eyes/eyestate.onnx --steps 3000
cp runs/eyes/eyestate.onnx engine/weights/
echo "eye-state net written to engine/weights/eyestate.onnx (from runs/eyes)"
[ -e runs/landmark_expression/landmark_expression.npz ] || $PY -m trainers.train_landmark_expression \
    --data runs/data/synth0 runs/data/synth2 runs/data/synth4 runs/data/synth5 --val runs/data/synth_val \
    --coarse-weights runs/coarse_stage4/coarsenet.onnx --out runs/landmark_expression/landmark_expression.npz
cp runs/landmark_expression/landmark_expression.npz engine/weights/
echo "landmark-expression MLP written to engine/weights/landmark_expression.npz (from runs/landmark_expression)"
