"""The whole pipeline, chained the way demo.sh runs it: generate -> train -> evaluate -> infer."""
import csv
import json

import eval_compare
import generate_qa
import quick_infer
import train_qlora_hf


def test_four_stages_chain(tiny_model, tmp_path, repo_root, capsys):
    data, run, out = tmp_path / "data", tmp_path / "models" / "run", tmp_path / "outputs"
    qa, evalq = data / "synthetic_qa.jsonl", data / "eval_questions.jsonl"

    assert generate_qa.main(["--backend", "offline", "--input", str(repo_root / "data" / "sample_abstracts.jsonl"),
                             "--out", str(qa), "--eval_out", str(evalq)]) == 0
    train_records = [json.loads(line) for line in qa.read_text(encoding="utf-8").splitlines()]
    eval_records = [json.loads(line) for line in evalq.read_text(encoding="utf-8").splitlines()]
    assert len(train_records) >= 300 and len(eval_records) >= 10
    train_papers = {r["meta"]["paper_id"] for r in train_records}
    assert not train_papers & {r["paper_id"] for r in eval_records if r["set"] == "unseen"}
    assert {r["paper_id"] for r in eval_records if r["set"] == "knowledge"} <= train_papers

    assert train_qlora_hf.main(["--jsonl", str(qa), "--model", str(tiny_model), "--out", str(run),
                                "--epochs", "1", "--batch", "8", "--grad_accum", "1", "--lr", "2e-3", "--bf16",
                                "--max_seq_len", "1024", "--max_steps", "6", "--save_steps", "3"]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "run_config.json", "metrics.json", "loss.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "run_config.json").read_text())["base_model"] == str(tiny_model)

    # the base model comes from the run folder, as a user would rely on
    # a few questions of each set
    few = [r for k in ("unseen", "knowledge") for r in [e for e in eval_records if e["set"] == k][:3]]
    (data / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in few), encoding="utf-8")
    assert eval_compare.main(["--adapter", str(run), "--questions", str(data / "few.jsonl"),
                              "--out", str(out / "evaluation.csv"), "--max_new_tokens", "12"]) == 0
    with open(out / "evaluation.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and [r["set"] for r in rows] == ["unseen"] * 3 + ["knowledge"] * 3
    assert {"id", "type", "question", "reference", "base_answer", "finetuned_answer"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert {k: v["n"] for k, v in summary["sets"].items()} == {"unseen": 3, "knowledge": 3}
    assert summary["evidence"]["n"] == 6
    for name in ("evaluation_for_marking.csv", "summary.json", "results_bar.png"):
        assert (out / name).is_file(), name

    capsys.readouterr()
    assert quick_infer.main(["--adapter", str(run), "--prompt", eval_records[0]["question"],
                             "--max_new_tokens", "8", "--model", "both"]) == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "fine-tuned" in printed
