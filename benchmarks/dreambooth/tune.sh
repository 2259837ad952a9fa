#!/usr/bin/env bash
# The tuning sweep behind the offline default's settings (README "Tuning"): the tuning split (1,000 training-set
# ankle boots that are not instance images; 32 before session 9), seeds ${SEEDS:-3 4 5 6 7 8} (six seeds, none of
# the report's 0-2, since session 12; seeds 10-12 before, seed 10 alone before session 8), prior loss on the
# generated class images; never the held-out report split.
# Usage: bash benchmarks/dreambooth/tune.sh [OUT [ARGS...]]  (one results.md per setting in OUT/)
set -euo pipefail
OUT=${1:-outputs/dreambooth-tuning}
shift || true      # the remaining arguments go to every tuning run
SUBJECT=${TDRLT_CACHE:-$HOME/.cache/tdrlt_peft}/fashion-mnist-subject
# the subject's folders (instance, tuning, report) exist after the first default run; write them now on a fresh cache
python -c "import sys; from pathlib import Path; from benchmarks.dreambooth.data import offline_subject; \
offline_subject(Path(sys.argv[1]))" "$SUBJECT"
# class images first (the prior-evaluation folder must exist before the sweep points at it); one cheap run
python -m benchmarks.dreambooth --method lora --lora_r 1 --max_train_steps 1 --seeds 10 \
  --class_data_dir "$OUT/class_images" --validation_data_dir "$SUBJECT/instance" \
  --prior_eval_data_dir "$SUBJECT/instance" --output_dir "$OUT/init" > /dev/null
# shellcheck disable=SC2206
COMMON=(--seeds ${SEEDS:-3 4 5 6 7 8} --validation_data_dir "$SUBJECT/tuning" --class_data_dir "$OUT/class_images"
        --prior_eval_data_dir "$OUT/class_images")
for lr in ${LRS:-4e-4 6e-4 1e-3}; do
  # shellcheck disable=SC2086
  python -m benchmarks.dreambooth --method tdlrt lora --lora_r ${RANKS:-2 8} --tau ${TAUS:-0.15 0.3 0.45} \
    --learning_rate "$lr" --tdlrt_learning_rate "$lr" \
    "${COMMON[@]}" --output_dir "$OUT/lr$lr" "$@"
done
