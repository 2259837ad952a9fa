#!/usr/bin/env bash
# Choosing TuckerAdapterConfig's defaults (issue #16, part 3) on a tuning split: --dataset rotten_tomatoes_tuning
# (training movies only; the reported split's movies are left out), LoRA's learning rate, LoRA r=8 beside it.
#   OUT=outputs/choose-defaults SEEDS="0 1" JOBS=2 bash benchmarks/glue/choose_defaults.sh
# One process per (configuration, seed), JOBS at a time, one thread each; the last step writes each folder's
# results.md. A configuration is "name:flags" with the flags joined by commas.
set -u
OUT=${OUT:-outputs/choose-defaults}
SEEDS=${SEEDS:-"0 1"}
JOBS=${JOBS:-2}
CONFIGS=${CONFIGS:-"lora_r8:--method,lora
r8_tau0.2:--method,tdlrt,--tau,0.2
r8_tau0.4:--method,tdlrt,--tau,0.4
r8_tau0.4_scale2:--method,tdlrt,--tau,0.4,--tdlrt_scale,2
r4_tau0.3:--method,tdlrt,--r,4,--tau,0.3
r4_tau0.3_scale2:--method,tdlrt,--r,4,--tau,0.3,--tdlrt_scale,2
r2_tau0.2:--method,tdlrt,--r,2,--tau,0.2
r1_tau0.25:--method,tdlrt,--r,1,--tau,0.25
r1_tau0.25_scale2:--method,tdlrt,--r,1,--tau,0.25,--tdlrt_scale,2
budget50_scale2:--method,tdlrt,--target_params,165888,--tdlrt_scale,2"}
# the library defaults apart from what a configuration sets: r 8, r_max 32, scale 1 (flags later on the line win)
BASE="--preset offline-full --dataset rotten_tomatoes_tuning --max_train_samples 2000 --num_train_epochs 2
      --r 8 --r_max 32 --tdlrt_scale 1 --learning_rate 1e-3"
mkdir -p "$OUT"
for seed in $SEEDS; do
  while IFS= read -r cfg; do
    [ -z "$cfg" ] && continue
    name=${cfg%%:*}; flags=${cfg#*:}
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 python -m benchmarks.glue $BASE ${flags//,/ } --seeds "$seed" --output_dir "$OUT/$name" \
      > "$OUT/${name}_$seed.log" 2>&1 &
  done <<< "$CONFIGS"
done
wait
for d in "$OUT"/*/; do
  python -c "import sys; from benchmarks.glue.report import write_report; print(write_report(sys.argv[1]))" "$d"
done
