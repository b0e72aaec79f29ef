# The two commands a newcomer needs; each installs what it needs into .venv first.
SHARED ?= ../shared
VIDEO ?= $(SHARED)/data/videos/d12.mp4

.PHONY: demo test setup bench weights clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/capture video $(VIDEO) --out takes/demo --overwrite

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/bench_pipeline.py

weights:  # reproduce engine/weights/ (coarsenet.{pt,onnx}, eyestate.onnx, landmark_expression.npz, finenet.{pt,onnx}; about 2 h 15 min on 2 cores; see README)
	bash scripts/train_coarse.sh
	bash scripts/train_fine.sh

clean:
	rm -rf takes build
