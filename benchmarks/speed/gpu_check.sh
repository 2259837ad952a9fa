#!/usr/bin/env bash
# Every GPU target of issue #13 in at most 6 minutes on one GPU; prints each ratio and a final summary.
#
#   bash benchmarks/speed/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash benchmarks/speed/gpu_check.sh --device cpu --quick    # smoke run of the same parts on a CPU
#
# Parts (each under `timeout`, each one process writing one JSON; see benchmarks/speed/gpu_check.py):
#   counts   compute ops / linalg calls / host reads / CUDA syncs of one integrator step (36, 72 adapters)
#   minilm   whole training step TDLRT / LoRA, bf16 autocast, all-MiniLM-L6-v2, batch 32 x 128, integrator
#            share, then the same with TDLRTIntegrator(..., cuda_graph=True)
#   deberta  the same on DeBERTa-v3-base shapes (random weights), batch 32 x 128
#   glue     the GLUE demo (python -m benchmarks.glue --preset demo; the Trainer uses the GPU when present)
#   summary  every ratio against its target (step <= 1.10x LoRA, integrator <= 5 %, cuda graph <= 1.05x)
# Installs nothing. Results: $OUT/gpu_check if OUT is set, else outputs/gpu_check.
set -u
cd "$(dirname "$0")/../.."
DIR="${OUT:+$OUT/gpu_check}"
DIR="${DIR:-outputs/gpu_check}"
mkdir -p "$DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEVICE=cuda
EXTRA=()
GLUE_EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) EXTRA+=(--quick); GLUE_EXTRA=(--max_steps 2 --max_eval_samples 32 --max_train_samples 64); shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
SCALE=1                       # the time limits are sized for one GPU; a CPU smoke run gets 6x longer ones
if [ "$DEVICE" = cpu ]; then GLUE_EXTRA+=(--use_cpu); SCALE=6; fi
START=$SECONDS

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $DIR/NAME.log, report rc and time
  local name=$1 limit=$(($2 * SCALE)) t0=$SECONDS rc
  shift 2
  timeout -k 2 "$limit" "$@" >"$DIR/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "== $name: ok in $((SECONDS - t0)) s"
    grep -E "TDLRT/LoRA|cuda_graph|^\|" "$DIR/$name.log" | head -20
  else
    [ $rc -eq 124 ] && echo "== $name: TIMED OUT after ${limit} s" || echo "== $name: FAILED (rc $rc)"
    tail -n 8 "$DIR/$name.log"
  fi
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
PY=(python -m benchmarks.speed.gpu_check)
part counts 45 "${PY[@]}" counts --device "$DEVICE" --out "$DIR" "${EXTRA[@]}"
part minilm 70 "${PY[@]}" step --model minilm --cuda-graph --device "$DEVICE" --out "$DIR" "${EXTRA[@]}"
part deberta 100 "${PY[@]}" step --model deberta --cuda-graph --device "$DEVICE" --out "$DIR" "${EXTRA[@]}"
part glue 105 python -m benchmarks.glue --preset demo --output_dir "$DIR/glue_demo" "${GLUE_EXTRA[@]}"
echo "== summary (all parts: $((SECONDS - START)) s)"
timeout $((15 * SCALE)) "${PY[@]}" summary --out "$DIR"
echo "logs, part JSONs, summary.md / summary.json in $DIR/"
