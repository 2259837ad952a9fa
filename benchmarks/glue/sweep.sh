#!/usr/bin/env bash
# The tau / scale sweep of the README (GLUE runner, --preset offline-full): LoRA and TDLRT at several (tau, scale),
# one process per (configuration, seed), all in parallel (meant for one GPU; on 2 CPU cores run fewer at a time).
#   CONFIGS="0.2:1 0.25:1 0.3:1 0.25:2" SEEDS="0 1 2" OUT=outputs/glue-sweep bash benchmarks/glue/sweep.sh [runner flags]
# Each configuration gets its own folder with one JSON per seed; the last step writes each folder's results.md.
set -u
CONFIGS=${CONFIGS:-"0.2:1 0.25:1 0.3:1 0.25:2"}
SEEDS=${SEEDS:-"0 1 2"}
OUT=${OUT:-outputs/glue-sweep}
mkdir -p "$OUT"
for seed in $SEEDS; do
  python -m benchmarks.glue --preset offline-full --method lora --seeds "$seed" --output_dir "$OUT/lora" "$@" \
    > "$OUT/lora_$seed.log" 2>&1 &
  for cfg in $CONFIGS; do
    tau=${cfg%:*}; scale=${cfg#*:}
    python -m benchmarks.glue --preset offline-full --method tdlrt --tau "$tau" --tdlrt_scale "$scale" \
      --seeds "$seed" --output_dir "$OUT/tdlrt_tau${tau}_s${scale}" "$@" > "$OUT/tdlrt_tau${tau}_s${scale}_$seed.log" 2>&1 &
  done
done
wait
for d in "$OUT"/*/; do
  python -c "import sys; from benchmarks.glue.report import write_report; print(write_report(sys.argv[1]))" "$d"
done
