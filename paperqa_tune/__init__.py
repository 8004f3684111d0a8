"""Machinery behind the four scripts (generate_qa.py, train_qlora_hf.py, eval_compare.py, quick_infer.py).

The scripts are what users run and edit; this package holds the mechanisms they share, one per module.
Functions take explicit values (never an argparse namespace) and keep no module-level mutable state.
"""
