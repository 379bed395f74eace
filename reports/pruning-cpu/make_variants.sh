#!/usr/bin/env bash
# Make every pruned variant the pruning-cpu benchmark reads (runs/ is git-ignored).
#   bash reports/pruning-cpu/make_variants.sh [FINETUNE_STEPS]    # default 1500 recovery steps
# Recovery runs resume where they stopped: re-run the same command after an interruption.
# Set OMP_NUM_THREADS=1 to run it beside another job on a 2-core machine.
set -euo pipefail
ft="${1:-1500}"
out=runs/prune/tiny-shapes
cfg=configs/prune/prune30.yaml
mkdir -p "$out"
for r in 30 20 50; do
  [ -f "$out/channels-$r/sdwb.json" ] || \
    sdwb compress prune --model builtin:tiny-shapes --config $cfg --ratio 0.$r --finetune-steps 0 -o "$out/channels-$r"
  [ -f "$out/channels-$r-ft/sdwb.json" ] || \
    sdwb compress prune --model builtin:tiny-shapes --config $cfg --ratio 0.$r --finetune-steps "$ft" -o "$out/channels-$r-ft"
done
[ -f "$out/blocks-ft/sdwb.json" ] || \
  sdwb compress prune --model builtin:tiny-shapes --method blocks --finetune-steps "$ft" \
    --set data.latent_pool=4096 --set finetune.warmup=100 -o "$out/blocks-ft"
