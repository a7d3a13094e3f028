#!/usr/bin/env bash
# The GPU check: the GPU test tier and the GPU benchmarks in one command, one summary table at the end.
#
#   bash benchmarks/gpu_check.sh              # or: make gpu-check   (about 8 minutes on one H100/H200)
#   PY=python OUT=runs/gpu_check bash benchmarks/gpu_check.sh
#
# 1. pytest -m gpu tests/test_gpu.py: the task-world chain on a ~190M GQA core, LoRA/QLoRA, rollout engine
#    greedy == transformers' generate, exact resume on CUDA, train.compile, the vLLM engine where installed;
# 2. benchmarks/pretrain_throughput.py --gpt2-small: the GPT core at GPT-2-small shape, tokens/s and MFU
#    (against the data sheet's dense bf16 peak and a measured matmul peak), eager and compiled;
# 3. benchmarks/compare_trl.py --device cuda: aligner against TRL on a ~0.45B Llama (SFT, DPO, GRPO);
# 4. benchmarks/recipe_vram.py: peak GPU memory and step time of recipes/real/ at their shapes.
# Every step writes its output under $OUT; a failed step is reported in the table and the rest still run.
set -u
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
status() { if [ "$1" -eq 0 ]; then echo ok; else echo "failed ($1)"; fi; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)" \
  > "$OUT/versions.txt" 2>&1

start=$(date +%s)
"$PY" -m pytest -q -rs -m gpu tests/test_gpu.py > "$OUT/test_gpu.log" 2>&1; tests=$?
"$PY" benchmarks/pretrain_throughput.py --device cuda --gpt2-small --precision bf16 --steps 10 \
  --json "$OUT/pretrain_eager.json" > "$OUT/pretrain_eager.log" 2>&1; eager=$?
"$PY" benchmarks/pretrain_throughput.py --device cuda --gpt2-small --precision bf16 --steps 10 --compile \
  --json "$OUT/pretrain_compiled.json" > "$OUT/pretrain_compiled.log" 2>&1; compiled=$?
"$PY" benchmarks/compare_trl.py --device cuda --trainers sft dpo grpo --vocab 32768 --steps 5 --warmup 2 \
  --json "$OUT/compare_trl.json" > "$OUT/compare_trl.log" 2>&1; trl=$?
"$PY" benchmarks/recipe_vram.py --json "$OUT/recipe_vram.json" > "$OUT/recipe_vram.log" 2>&1; vram=$?
end=$(date +%s)

echo
echo "aligner GPU check on $(head -n 1 "$OUT/gpu.txt"); torch / CUDA / transformers $(cat "$OUT/versions.txt")"
echo "wall time $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s; logs and JSON in $OUT"
echo
echo "| check | result |"
echo "|---|---|"
echo "| GPU test tier (pytest -m gpu) | $(status $tests): $(tail -n 1 "$OUT/test_gpu.log") |"
"$PY" benchmarks/gpu_summary.py "$OUT" "$eager" "$compiled" "$trl" "$vram"
