#!/usr/bin/env bash
# Offline CPU demo of the whole pipeline on a tiny model: sets up .venv, then
# generate (offline backend) -> train (QLoRA, 4-bit NF4 on CPU) -> evaluate -> one quick inference.
# Every artifact stays in data/, models/, outputs/. Rerunnable: it passes --overwrite.
set -euo pipefail
cd "$(dirname "$0")"
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0 -r requirements.txt
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== 0. a tiny random-init Mistral chat model with Zephyr's template (stands in for Zephyr-7B-beta)"
python tools/make_tiny_model.py --out models/tiny-zephyr

echo "== 1. generate Q&A from data/sample_abstracts.jsonl (offline rule-based backend, no LLM)"
python generate_qa.py --backend offline --input data/sample_abstracts.jsonl --overwrite

echo "== 2. QLoRA fine-tuning (the seed's flags, pointed at the tiny model; one short epoch)"
python train_qlora_hf.py --jsonl ./data/synthetic_qa.jsonl --model models/tiny-zephyr \
  --out ./models/tiny-qlora --epochs 1 --batch 8 --grad_accum 1 --lr 2e-3 --bf16 --max_seq_len 1024 \
  --overwrite

echo "== 3. base vs fine-tuned on the held-out questions -> outputs/"
python eval_compare.py --adapter models/tiny-qlora --questions data/eval_questions.jsonl \
  --out outputs/evaluation.csv --max_new_tokens 48 --batch_size 12 --overwrite

echo "== 4. one quick inference with the adapter"
python quick_infer.py --adapter models/tiny-qlora --model both --max_new_tokens 32 \
  --prompt "What does QLoRA quantize to 4 bits?"

echo
echo "Done. Look at: data/synthetic_qa.jsonl, data/eval_questions.jsonl, models/tiny-qlora/ (loss.png),"
echo "outputs/evaluation.csv, outputs/evaluation_for_marking.csv, outputs/summary.json, outputs/results_bar.png"
echo "(The tiny model is random: its answers are gibberish. The demo shows the pipeline, not quality.)"
