#!/usr/bin/env bash
# reports/engines-cpu from nothing: the variants, the tiny-shapes comparison at 2 threads (with
# quality) and at 1 thread (latency), the sd15-arch UNet per call of every engine, and the tables.
# Keep the machine quiet while it runs (~1.5 h on 2 cores). Variants go to runs/engines/.
#   bash tools/engines_cpu.sh            # everything
#   bash tools/engines_cpu.sh tiny       # the tiny-shapes part only
#   bash tools/engines_cpu.sh sd15       # the sd15-arch part only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SDWB=.venv/bin/sdwb
PY=.venv/bin/python
W=runs/engines
OUT=reports/engines-cpu
part=${1:-all}
quantize() { [ -f "$2/manifest.json" ] || $SDWB compress quantize --model "$1" "${@:3}" -o "$2"; }

if [ "$part" = all ] || [ "$part" = tiny ]; then
  [ -f $W/tiny/onnx/manifest.json ] || $SDWB export onnx --model builtin:tiny-shapes -o $W/tiny/onnx
  quantize $W/tiny/onnx $W/tiny/ort-int8-static-fused --method ort-int8-static --set fuse_attention=true
  quantize $W/tiny/onnx $W/tiny/ov-int8-static --method ov-int8-static
  quantize $W/tiny/onnx $W/tiny/ov-int8-hybrid --method ov-int8-hybrid
  $SDWB bench configs/bench/engines-cpu.yaml -o $OUT/tiny-2threads --no-progress
  $SDWB bench configs/bench/engines-cpu.yaml --threads 1 --metrics latency \
    -o $OUT/tiny-1thread --no-progress
fi
if [ "$part" = all ] || [ "$part" = sd15 ]; then
  [ -f $W/sd15/onnx/manifest.json ] || $SDWB export onnx --model builtin:sd15-arch -o $W/sd15/onnx
  quantize $W/sd15/onnx $W/sd15/ort-int8-static-fused --config configs/quantize/ort-int8-static-sd15.yaml \
    --set fuse_attention=true
  quantize $W/sd15/onnx $W/sd15/ov-int8-static --config configs/quantize/ov-int8-static-sd15.yaml
  quantize $W/sd15/onnx $W/sd15/ov-int8-hybrid --config configs/quantize/ov-int8-hybrid-sd15.yaml
  $PY -m tools.engines_unet_bench -o $OUT/sd15-arch --model builtin:sd15-arch \
    --engine torch-fp32=torch-fp32 --engine torch-bf16=torch-bf16 \
    --engine compile-fp32=compile-fp32 --engine compile-bf16=compile-bf16 \
    --engine ort-fp32=onnxruntime:$W/sd15/onnx --engine ort-int8-fused=onnxruntime:$W/sd15/ort-int8-static-fused \
    --engine ov-fp32=openvino-fp32:$W/sd15/onnx --engine ov-bf16=openvino-bf16:$W/sd15/onnx \
    --engine ov-int8-static=openvino-fp32:$W/sd15/ov-int8-static \
    --engine ov-int8-hybrid=openvino-fp32:$W/sd15/ov-int8-hybrid \
    --engine torch-fp32-again=torch-fp32
fi
$PY -m tools.engines_report $OUT
