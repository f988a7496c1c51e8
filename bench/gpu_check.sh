#!/usr/bin/env bash
# The GPU check: one script, for when a GPU machine is lent (under 8 minutes on one GPU).
#
#   bash bench/gpu_check.sh [OUT]            # on a GPU (refuses to run without one)
#   bash bench/gpu_check.sh --dry-run [OUT]  # everything at toy sizes on the CPU
#
# Prints the device, then with mixed precision and XLA on (bench/run.py's defaults on a
# GPU) measures, side by side in one run each:
#   1. bench/run.py on all-MiniLM-L6-v2-sized BERT and the CNN segmenter: wrap overhead
#      (wrap_all / plain), keras-peft LoRA against keras-hub's enable_lora, top_layers(2)
#      against full fine-tuning, all-linear LoRA, with peak device memory per config;
#   2. bench/caching_minilm.py: the frozen-prefix cache against uncached training;
#   3. the BERT recipe on the demo sample (lora:8, one epoch): the recipe's GPU path
#      (mixed precision and XLA chosen by itself).
# Everything goes to OUT (default bench/results/gpu; --dry-run: bench/results/quick/gpu),
# with a summary in OUT/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ "$DRY" = 1 ]; then OUT=${1:-bench/results/quick/gpu}; else OUT=${1:-bench/results/gpu}; fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || make venv >/dev/null
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=2
SECONDS=0

echo "== device"
"$PY" - "$OUT" "$DRY" <<'EOF'
import json, sys
import tensorflow as tf
out, dry = sys.argv[1], sys.argv[2] == "1"
gpus = tf.config.list_physical_devices("GPU")
details = [tf.config.experimental.get_device_details(g) for g in gpus]
info = {"gpus": [d.get("device_name", "GPU") for d in details], "dry_run": dry,
        "tensorflow": tf.__version__}
print(json.dumps(info))
json.dump(info, open(f"{out}/device.json", "w"))
if not gpus and not dry:
    sys.exit("error: no GPU is visible to TensorFlow. Run with --dry-run to check the "
             "script on the CPU.")
EOF

echo "== bench/run.py (mixed precision and XLA on a GPU)"
if [ "$DRY" = 1 ]; then
    RUN_ARGS=(--quick --models minilm --configs plain,lora4 --reps 2 --steps 2
              --precision float32 --jit off)
else
    RUN_ARGS=(--models minilm,cnn --configs plain,wrap_all,top_layers_2,lora4,hub_lora4,lora8_all
              --reps 4 --steps 20 --precision mixed_float16 --jit on)
fi
"$PY" bench/run.py "${RUN_ARGS[@]}" --out "$OUT/suite"

echo "== bench/caching_minilm.py"
if [ "$DRY" = 1 ]; then
    CACHE_ARGS=(--only head_only --train 32 --eval 16 --epochs 2 --batch-size 8
                --sequence-length 16 --no-jit)
else
    CACHE_ARGS=(--train 2048 --eval 512 --epochs 3)
fi
"$PY" bench/caching_minilm.py "${CACHE_ARGS[@]}" --out "$OUT/caching"

echo "== BERT recipe on the demo sample"
if [ "$DRY" = 1 ]; then
    BERT_ARGS=(--max-examples 32 --sequence-length 16 --batch-size 8 --no-xla)
else
    BERT_ARGS=(--batch-size 32 --sequence-length 32)
fi
"$PY" recipes/bert_text_classification.py --data recipes/data/sentiment_demo.tsv \
    --strategy lora:8 --epochs 1 --validation-fraction 0.3 --verbose 0 \
    "${BERT_ARGS[@]}" --output-dir "$OUT/bert_demo"

echo "== summary"
"$PY" - "$OUT" "$SECONDS" <<'EOF'
import json, os, sys
out, seconds = sys.argv[1], int(sys.argv[2])
lines = [f"device: {json.load(open(os.path.join(out, 'device.json')))}",
         f"wall: {seconds} s"]
suite = json.load(open(os.path.join(out, "suite", "suite.json")))
for model in suite["models"]:
    for name, row in model["rows"].items():
        ratio = row.get("ratio")
        lines.append(f"{model['model']:>10} {name:<14} median {row['median_ms']:9.1f} ms"
                     + (f"  vs plain {ratio:.3f}" if isinstance(ratio, (int, float)) else "")
                     + (f"  peak GPU {row['peak_gpu_mb']:,.0f} MB"
                        if row.get("peak_gpu_mb") is not None else ""))
for r in json.load(open(os.path.join(out, "caching.json")))["results"]:
    lines.append(f"caching {r['strategy']}: {r['speedup_vs_default']:.2f}x faster than "
                 f"uncached (keras-peft default), {r['speedup_vs_inference_prefix']:.2f}x than "
                 f"the same training uncached; weights differ by at most "
                 f"{r['cached']['max_abs_weight_difference']:.1e}")
bert = json.load(open(os.path.join(out, "bert_demo", "lora-8", "results.json")))
lines.append(f"bert demo lora:8: accuracy {bert['val_accuracy']:.3f}, mean step "
             f"{bert['mean_step_s']:.4f} s, GPU peak {bert.get('gpu_peak_memory_mb')} MB")
text = "\n".join(lines)
print(text)
open(os.path.join(out, "summary.txt"), "w").write(text + "\n")
EOF
