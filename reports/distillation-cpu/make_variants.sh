#!/usr/bin/env bash
# Make every step-distilled student the distillation-cpu benchmark reads (runs/ is git-ignored).
#   bash reports/distillation-cpu/make_variants.sh gd      # guidance 4 distilled: 32 -> 16 (1200 steps) -> 8 -> 4 -> 2 (400 each)
#   bash reports/distillation-cpu/make_variants.sh gd75    # guidance 7.5 distilled: 32 -> 16 -> 8 in one run, -> 4 -> 2 (400 each)
#   bash reports/distillation-cpu/make_variants.sh gd75l   # guidance 7.5 distilled with gd's budgets: 32 -> 16 (1200) -> 8 -> 4 -> 2 (400 each)
#   bash reports/distillation-cpu/make_variants.sh gd75t   # gd75l with every round's start points on its teacher's own paths
#   bash reports/distillation-cpu/make_variants.sh gd75h   # the same with half of each batch on the paths, half on noised data
#   bash reports/distillation-cpu/make_variants.sh gd75tl  # gd75t with a 3000-step guidance round
#   bash reports/distillation-cpu/make_variants.sh cfg     # no guidance distilled (CFG 7.5 at sampling): 32 -> ... -> 2 (250 each)
#   bash reports/distillation-cpu/make_variants.sh lcm     # latent consistency, guidance 4, one run of 800 steps (configs/distill/lcm4.yaml)
#   bash reports/distillation-cpu/make_variants.sh lcm75   # the same at guidance 7.5
# Budgets are what the committed benchmark ran. gd's rounds are configs/distill/distill4.yaml's (the
# shipped builtin:tiny-shapes-4step is gd-4step), one command per round so every student is kept.
# Each command is resumable; a finished student is skipped. Set OMP_NUM_THREADS=1 to run two chains
# side by side on a 2-core machine. Each round distils the previous student further.
set -euo pipefail
chain="${1:?usage: $0 gd|gd75|gd75l|gd75t|gd75h|gd75tl|cfg|lcm|lcm75}"
D=runs/distill/tiny-shapes
C=configs/distill/distill4.yaml
mkdir -p "$D"
later=(-c $C --no-guidance-distill)   # rounds after the first: guidance (if any) is already distilled in

halve() {  # halve NAME FROM TO [ARGS...]: $D/NAME-TOstep from $D/NAME-FROMstep
  local name=$1 from=$2 to=$3
  shift 3
  [ -f "$D/$name-${to}step/sdwb.json" ] || \
    sdwb compress distill "${later[@]}" --model "$D/$name-${from}step" --teacher-steps "$from" \
      --student-steps "$to" "$@" -o "$D/$name-${to}step"
}

case "$chain" in
  gd)
    [ -f "$D/gd-16step/sdwb.json" ] || \
      sdwb compress distill -c $C --teacher-steps 32 --student-steps 16 -o "$D/gd-16step"
    halve gd 16 8; halve gd 8 4; halve gd 4 2 ;;
  gd75)
    [ -f "$D/gd75-8step/sdwb.json" ] || \
      sdwb compress distill -c $C --guidance 7.5 --set guidance_budget=null --teacher-steps 32 --student-steps 8 \
        -o "$D/gd75-8step"
    halve gd75 8 4; halve gd75 4 2 ;;
  gd75l)
    [ -f "$D/gd75l-16step/sdwb.json" ] || \
      sdwb compress distill -c $C --guidance 7.5 --teacher-steps 32 --student-steps 16 -o "$D/gd75l-16step"
    halve gd75l 16 8; halve gd75l 8 4; halve gd75l 4 2 ;;
  gd75t|gd75h|gd75tl)  # trajectory_fraction 1.0 / 0.5 (compress/trajectories.py), in every round
    case "$chain" in gd75h) paths=(--set trajectory_fraction=0.5) ;; *) paths=(--set trajectory_fraction=1.0) ;; esac
    first=(); [ "$chain" = gd75tl ] && first=(--set guidance_budget=3000)
    [ -f "$D/$chain-16step/sdwb.json" ] || \
      sdwb compress distill -c $C --guidance 7.5 --teacher-steps 32 --student-steps 16 "${paths[@]}" \
        "${first[@]}" -o "$D/$chain-16step"
    halve "$chain" 16 8 "${paths[@]}"; halve "$chain" 8 4 "${paths[@]}"; halve "$chain" 4 2 "${paths[@]}" ;;
  cfg)
    [ -f "$D/cfg-8step/sdwb.json" ] || \
      sdwb compress distill "${later[@]}" --teacher-steps 32 --student-steps 8 --budget 250 -o "$D/cfg-8step"
    halve cfg 8 4 --budget 250; halve cfg 4 2 --budget 250 ;;
  lcm)
    [ -f "$D/lcm-4step/sdwb.json" ] || sdwb compress distill -c configs/distill/lcm4.yaml -o "$D/lcm-4step" ;;
  lcm75)
    [ -f "$D/lcm75-4step/sdwb.json" ] || \
      sdwb compress distill -c configs/distill/lcm4.yaml --guidance 7.5 -o "$D/lcm75-4step" ;;
  *)
    echo "usage: $0 gd|gd75|gd75l|gd75t|gd75h|gd75tl|cfg|lcm|lcm75" >&2; exit 2 ;;
esac
