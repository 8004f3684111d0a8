"""The training loop's typed state (paperqa_tune/train/state.py) and its on-disk form: a checkpoint's
trainer_state.json keeps the dict the loop wrote before the state was a class, so step folders written by
earlier versions resume (tests/test_reliability_train.py resumes real ones end to end)."""
from __future__ import annotations

import json

import pytest

from paperqa_tune.train.state import StepStats, TrainState

# trainer_state.json of step-2 as the dict-based loop wrote it (its keys and value types, fingerprint and flags
# included: the checkpoint adds those beside the state)
OLD_STEP_2 = {
    "step": 2, "micro": 2,
    "train": [{"step": 1, "epoch": 0.3333, "loss": 3.25, "lr": 0.001, "grad_norm": 1.5, "trained_tokens": 40,
               "input_tokens": 120, "padded_tokens": 130, "seconds": 0.5, "tokens_per_s": 240.0, "micro_batch": 2},
              {"step": 2, "epoch": 0.6667, "loss": 3.0, "lr": 0.0009, "grad_norm": 1.25, "trained_tokens": 38,
               "input_tokens": 110, "padded_tokens": 110, "seconds": 0.25, "tokens_per_s": 440.0, "micro_batch": 2}],
    "val": [{"step": 2, "loss": 3.1}], "oom_backoffs": [{"step": 1, "from": 4, "to": 2}], "train_seconds": 0.75,
    "trained_tokens": 78, "input_tokens": 230, "padded_tokens": 240,
    "fingerprint": {"samples_sha256": "ab", "samples_per_step": 2, "total_steps": 6, "seed": 42,
                    "group_by_length": True, "shuffle": True, "optimizer": "adamw_torch flat"},
    "flags": {"model": "m", "lora_r": 16},
}


def test_an_old_checkpoint_state_reads_back_and_saves_the_same_keys():
    state = TrainState.from_state_dict(json.loads(json.dumps(OLD_STEP_2)))
    assert (state.step, state.micro, state.trained_tokens, state.val) == (2, 2, 78, [{"step": 2, "loss": 3.1}])
    saved = {k: v for k, v in OLD_STEP_2.items() if k not in ("fingerprint", "flags")}
    assert state.state_dict() == saved  # written back exactly as the dict-based loop wrote it


def test_record_continues_an_old_state_as_the_dict_based_loop_did():
    state = TrainState.from_state_dict(OLD_STEP_2)
    state.record(StepStats(loss=2.5, lr=8e-4, grad_norm=1.0, trained_tokens=42, input_tokens=100, padded_tokens=120,
                           seconds=0.5), steps_per_epoch=3)
    assert state.step == 3 and state.train_seconds == pytest.approx(1.25)
    assert (state.trained_tokens, state.input_tokens, state.padded_tokens) == (120, 330, 360)
    assert state.train[-1] == {"step": 3, "epoch": 1.0, "loss": 2.5, "lr": 8e-4, "grad_norm": 1.0,
                               "trained_tokens": 42, "input_tokens": 100, "padded_tokens": 120, "seconds": 0.5,
                               "tokens_per_s": 200.0, "micro_batch": 2}
    assert set(state.train[-1]) == set(OLD_STEP_2["train"][0])


def test_halving_the_micro_batch_is_noted():
    state = TrainState(micro=8)
    assert state.halve_micro(step=1) == 4 and state.halve_micro(step=1) == 2
    assert state.micro == 2 and state.oom_backoffs == [{"step": 1, "from": 8, "to": 4}, {"step": 1, "from": 4, "to": 2}]


@pytest.mark.parametrize("change, named", [({"micro": None}, "micro"), ({"step": True}, "step"),
                                           ({"train": {}}, "train"), ({"micro": 0}, "step/micro")])
def test_a_state_of_the_wrong_shape_is_refused_naming_it(change, named):
    saved = {**OLD_STEP_2, **change}
    if change.get("micro", 1) is None:
        del saved["micro"]
    with pytest.raises(ValueError, match=named):
        TrainState.from_state_dict(saved)


def test_memorisation_warning_follows_the_train_validation_gap():
    from paperqa_tune.runs import memorisation_warning

    def metrics(train, val):
        return {"final_train_loss": train, "val": [{"step": i, "loss": v} for i, v in enumerate(val)]}

    # SmolLM2-135M, lr 1e-3: 8 epochs memorised (validation up from its best, training far below), 4 epochs did not
    assert "memorised" in memorisation_warning(metrics(0.21, [2.9, 2.5, 3.1, 4.06]))
    assert memorisation_warning(metrics(1.06, [2.9, 2.55, 2.86])) is None
    assert memorisation_warning(metrics(2.6, [3.0, 2.7, 2.55])) is None  # still improving
    assert memorisation_warning(metrics(0.2, [3.0])) is None  # one validation point says nothing
