#!/usr/bin/env bash
# GPU check for paper scale: a few training steps of each trained generator at the paper grid
# (96x128x96, PAPER networks, mixed precision on CUDA), DDIM and DDPM sampling throughput,
# image generation by both image generators, and nnU-Net 3d_fullres training iterations with
# nnU-Net's own plans; prints times and peak GPU memory. Sized to finish within about 8 minutes
# on one data-centre GPU. A failing part is reported and the other still runs (exit status 1).
#
#   bash benchmarks/gpu_check.sh          # CUDA (fails when no GPU is visible)
#   bash benchmarks/gpu_check.sh --cpu    # the same script on CPU at the demo grid (what the test runs;
#                                         # DDPM extrapolated, spade_diffusion images with 5 DDIM steps)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ "${1:-}" == "--cpu" ]]; then
    device=cpu grid=demo steps=3 iterations=2 epochs=1 sampling_flags="--ddpm-steps-measured --image-ddim-steps 5"
else
    device=cuda grid=paper steps=8 iterations=40 epochs=2 sampling_flags=
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible (use --cpu)')"
fi
export PYTHONPATH="$PWD/workflow${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
failed=()
echo "== generators: ${grid} grid on ${device}"
"$PY" benchmarks/generators.py --grid "$grid" --device "$device" --steps "$steps" $sampling_flags || failed+=(generators)
echo "== nnU-Net 3d_fullres: ${grid} grid on ${device}, eager"
"$PY" benchmarks/nnunet_iterations.py --grid "$grid" --device "$device" --iterations "$iterations" \
    --epochs "$epochs" --compile off || failed+=(nnunet)
if [[ $device == cuda ]]; then
    echo "== nnU-Net 3d_fullres: ${grid} grid on ${device}, nnU-Net's default torch.compile"
    "$PY" benchmarks/nnunet_iterations.py --grid "$grid" --device "$device" --iterations "$iterations" \
        --epochs "$epochs" || failed+=(nnunet_compiled)
fi
echo "gpu_check done in $(( $(date +%s) - start )) s${failed[*]:+, FAILED: ${failed[*]}}"
[[ ${#failed[@]} -eq 0 ]]
