#!/usr/bin/env bash
# Make every quantized variant the quantization-cpu benchmark reads (runs/ is git-ignored).
#   bash reports/quantization-cpu/make_variants.sh tiny-shapes   # ~4 min on 2 cores (torchao: pip install -e '.[torchao]')
#   bash reports/quantization-cpu/make_variants.sh sd15-arch     # ~40 min, peak RSS ~6 GB per torch variant
#   bash reports/quantization-cpu/make_variants.sh sd15-arch-ort # ~13 min: ONNX export (peak RSS 10.4 GB) + 2 int8 graphs (14.3 / 12.5 GB)
set -euo pipefail
which="${1:-tiny-shapes}"
out="runs/quantize/$which"
mkdir -p "$out"
if [ "$which" = tiny-shapes ]; then
  for m in torch-bf16 torch-bf16-pure torch-int8-dynamic torch-int8-static torchao-int8-weight-only \
           ort-int8-dynamic ort-int8-static; do
    sdwb compress quantize --model builtin:tiny-shapes --config "configs/quantize/$m.yaml" -o "$out/$m" --overwrite
  done
  sdwb compress quantize --model builtin:tiny-shapes --config configs/quantize/ort-int8-static.yaml \
    --set fuse_attention=true -o "$out/ort-int8-static-fused" --overwrite
elif [ "$which" = sd15-arch ]; then
  # Random weights: the guard's probe images are noise, so only NaN/inf and a low floor are checked,
  # with one 1-step probe (each 512x512 UNet call costs ~10 s here).
  guard=(--set guard.prompts=1 --set guard.steps=1 --min-psnr 10)
  for m in torch-bf16 torch-bf16-pure torch-int8-dynamic; do
    sdwb compress quantize --model builtin:sd15-arch --config "configs/quantize/$m.yaml" "${guard[@]}" \
      -o "$out/$m" --overwrite
  done
  sdwb compress quantize --model builtin:sd15-arch --config configs/quantize/torch-int8-static.yaml "${guard[@]}" \
    --set calibration.prompts=1 --set calibration.steps=2 --set calibration.timesteps=all -o "$out/torch-int8-static" --overwrite
elif [ "$which" = sd15-arch-ort ]; then
  mkdir -p runs/quantize/sd15-arch
  [ -f runs/sd15/ort-fp32/manifest.json ] || sdwb export onnx --model builtin:sd15-arch -o runs/sd15/ort-fp32
  sdwb compress quantize --model runs/sd15/ort-fp32 --config configs/quantize/ort-int8-static-sd15.yaml \
    -o runs/quantize/sd15-arch/ort-int8-static --overwrite
  # the same with the attention fused into ONNX Runtime's MultiHeadAttention (CPU flash attention)
  sdwb compress quantize --model runs/sd15/ort-fp32 --config configs/quantize/ort-int8-static-sd15.yaml \
    --set fuse_attention=true -o runs/quantize/sd15-arch/ort-int8-static-fused --overwrite
else
  echo "usage: $0 tiny-shapes|sd15-arch|sd15-arch-ort" >&2; exit 2
fi
