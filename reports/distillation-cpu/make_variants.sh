#!/usr/bin/env bash
# Make every step-distilled student the distillation-cpu benchmark reads (runs/ is git-ignored).
#   bash reports/distillation-cpu/make_variants.sh gd  [BUDGET]   # guidance-distilled chain 32 -> 16 -> 8 -> 4 -> 2
#   bash reports/distillation-cpu/make_variants.sh cfg [BUDGET]   # plain chain (CFG at sampling)   32 -> ... -> 2
#   bash reports/distillation-cpu/make_variants.sh lcm [BUDGET]   # latent consistency, one run on the 50-step grid
# BUDGET: optimizer steps per round. Defaults (what the committed benchmark ran, sized to one CPU
# session with pruning beside it): gd 400 per round, cfg 250 per round, lcm 800 in its one run.
# Each command is resumable; a finished student is skipped. Set OMP_NUM_THREADS=1 to run the two chains side by side on a 2-core machine.
# Each chain distils the previous student further, so the teacher of 8 -> 4 is the 8-step student.
set -euo pipefail
chain="${1:?usage: $0 gd|cfg|lcm [BUDGET]}"
D=runs/distill/tiny-shapes
C=configs/distill/distill4.yaml
mkdir -p "$D"
if [ "$chain" = lcm ]; then
  [ -f "$D/lcm-4step/sdwb.json" ] || \
    sdwb compress distill -c configs/distill/lcm4.yaml --budget "${2:-800}" -o "$D/lcm-4step"
  exit 0
fi
if [ "$chain" = cfg ]; then budget="${2:-250}"; else budget="${2:-400}"; fi
case "$chain" in
  gd)  first=(--guidance-distill) ;;
  cfg) first=(--no-guidance-distill) ;;
  *)   echo "usage: $0 gd|cfg|lcm [BUDGET]" >&2; exit 2 ;;
esac
[ -f "$D/$chain-8step/sdwb.json" ] || \
  sdwb compress distill -c $C "${first[@]}" --teacher-steps 32 --student-steps 8 --budget "$budget" -o "$D/$chain-8step"
[ -f "$D/$chain-4step/sdwb.json" ] || \
  sdwb compress distill -c $C --no-guidance-distill --model "$D/$chain-8step" --teacher-steps 8 --student-steps 4 \
    --budget "$budget" -o "$D/$chain-4step"
[ -f "$D/$chain-2step/sdwb.json" ] || \
  sdwb compress distill -c $C --no-guidance-distill --model "$D/$chain-4step" --teacher-steps 4 --student-steps 2 \
    --budget "$budget" -o "$D/$chain-2step"
