#!/usr/bin/env bash
# Offline CPU demo of the whole pipeline on a tiny model: sets up .venv, then tools/demo.py runs
# pretrain a tiny base (once, cached) -> generate (offline backend) -> train (QLoRA, 4-bit NF4 on CPU)
# -> evaluate base vs fine-tuned on held-out papers -> one quick inference. The settings are in tools/demo.py.
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

python tools/demo.py "$@"  # --real: the same on SmolLM2-135M-Instruct

echo
echo "Done. Look at: data/synthetic_qa.jsonl, data/eval_questions.jsonl, models/tiny-qlora/ (loss.png),"
echo "outputs/evaluation.csv, outputs/evaluation_for_marking.csv, outputs/summary.json, outputs/results_bar.png"
echo "(The tiny model, pretrained for a minute on 36 abstracts, learns behaviour and form from fine-tuning: refusing"
echo "what the abstract does not say, correcting false premises, answering in a sentence. It cannot know the answers"
echo "to questions about papers it was not fine-tuned on, so its facts are wrong: the demo shows the pipeline and"
echo "what fine-tuning changes, not the quality a 7B model reaches.)"
