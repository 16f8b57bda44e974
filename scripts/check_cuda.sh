#!/usr/bin/env bash
# The GPU checks (CI has no GPU): CUDA kernel adapters inside the ring schedule against fp64 (with the
# packed varlen flash path), the single-GPU benchmark of the ring schedule against one monolithic SDPA call
# per backend, per-piece vs packed varlen calls of the masked ring, and a short training run on CUDA.
# Results go to $OUT (default: ./cuda_check).
#   bash scripts/check_cuda.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-cuda_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
echo "== kernel adapters in the ring vs fp64 (tests/test_cuda_kernels.py)"
timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda_kernels.py --report-dir "$OUT" 2>&1 | tail -25
echo "== single GPU: simulated CP=4 ring vs one monolithic SDPA call (bf16, causal, GQA 32/8, D=128)"
timeout 150 $PY scripts/bench_attention.py --device cuda --cp 4 --seq-len 8192 32768 --heads 32 --kv-heads 8 \
    --head-dim 128 --dtype bfloat16 --causal --repeats 10 --warmup 3 --out "$OUT/bench_cuda.json" 2>&1 | tail -12
echo "== masked ring, per-piece vs packed varlen flash calls (scripts/bench_packing.py, bf16, cp 8 simulated)"
for S in 32768 131072; do
  timeout 300 $PY scripts/bench_packing.py --device cuda --seq-len $S --repeats 10 --simulate \
      --json "$OUT/packing_$S.json" 2>&1 | grep -v "^rank [1-7]:" | tail -14
done
echo "== training on CUDA (debug model, cp=1: one GPU cannot host two NCCL ranks)"
timeout 120 $PY train.py --config train_configs/debug_cpu.toml --training.steps 10 --metrics.log_freq 1 \
    --parallelism.context_parallel_degree 1 --job.dump_folder /tmp/cp_dtensor_cuda_train 2>&1 | grep -v "^\s*$" | tail -14
