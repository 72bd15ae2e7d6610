#!/usr/bin/env bash
# Regenerates the results of one trained twin from its committed weights file:
#   experiments/results/twins/run.sh cifar_plain20 [ANALYSIS ...]
# ANALYSIS: lesion landscape sharpness spectrum (the default: all four), lesion_bn_batch, landscape_bn_batch.
# then `python experiments/results/twins/figures.py` for the figures and tables.md.
# Needs the Fashion-MNIST test and training splits (jaxres data import, see docs) where the
# weights' config says (data_dir), or pass JAXRES_DATA_DIR=... to move it.
set -euo pipefail
net=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
weights=$here/weights/$net.safetensors
out=$here/$net
data=(); [[ -n "${JAXRES_DATA_DIR:-}" ]] && data=(--data-dir "$JAXRES_DATA_DIR")
analyses=("$@"); [[ ${#analyses[@]} -eq 0 ]] && analyses=(lesion landscape sharpness spectrum)
for analysis in "${analyses[@]}"; do
  case $analysis in
    lesion)    args=(--images 2000 --draws 5) ;;                      # ks 1..min(10, units)
    lesion_bn_batch)  # control: BatchNorm recomputes its statistics on each batch of 250 test images
               analysis=lesion; args=(--images 2000 --draws 5 --bn batch --out "$out/bn_batch") ;;
    landscape) args=(--grid=-1:1:15 --path-grid=-0.25:1.25:13 --images 500) ;;
    landscape_bn_batch)  # control: each chunk of 250 images normalizes with its own statistics
               analysis=landscape; args=(--grid=-1:1:15 --path-grid=-0.25:1.25:13 --images 500 --bn batch
                                         --out "$out/bn_batch") ;;
    sharpness) args=(--init --tol 1e-3 --max-iter 100) ;;             # the monitor's probe batch
    spectrum)  args=(--init --images 2 --num-matvecs 64 --num-probes 8) ;;
    *) echo "unknown analysis $analysis" >&2; exit 2 ;;
  esac
  echo "== $net $analysis: $(uptime)"
  jaxres inspect "$analysis" --checkpoint "$weights" --out "$out" "${data[@]}" "${args[@]}"  # a later --out wins
done
