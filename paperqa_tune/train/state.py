"""The training loop's state: where the run is (step, micro-batch), what it has done (loss history, tokens, time,
OOM back-offs). A checkpoint's trainer_state.json holds state_dict() (the same keys as metrics.json reports), and
from_state_dict() reads it back, also from checkpoints written before this class existed (the same dict). Beside
it, the facts the loop steps through unchanged: the Schedule and where it saves (Saving)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass(frozen=True)
class StepStats:
    """One optimizer step as the loop measured it (tokens of the whole step, all processes)."""
    loss: float
    lr: float
    grad_norm: float
    trained_tokens: int
    input_tokens: int
    padded_tokens: int
    seconds: float


@dataclass
class TrainState:
    micro: int                          # samples per forward pass now (lowered by the OOM back-off)
    step: int = 0                       # optimizer steps done
    train: list[dict] = field(default_factory=list)         # one row per step: loss, lr, tokens, speed
    val: list[dict] = field(default_factory=list)           # {"step", "loss"} per validation
    oom_backoffs: list[dict] = field(default_factory=list)  # {"step", "from", "to"} per halving
    train_seconds: float = 0.0
    trained_tokens: int = 0
    input_tokens: int = 0
    padded_tokens: int = 0

    def record(self, stats: StepStats, steps_per_epoch: int) -> None:
        """Count a finished optimizer step and add its row to the loss history."""
        self.step += 1
        self.train_seconds += stats.seconds
        self.trained_tokens += stats.trained_tokens
        self.input_tokens += stats.input_tokens
        self.padded_tokens += stats.padded_tokens
        self.train.append({"step": self.step, "epoch": round(self.step / steps_per_epoch, 4), "loss": stats.loss,
                           "lr": stats.lr, "grad_norm": stats.grad_norm, "trained_tokens": stats.trained_tokens,
                           "input_tokens": stats.input_tokens, "padded_tokens": stats.padded_tokens,
                           "seconds": stats.seconds, "tokens_per_s": stats.input_tokens / stats.seconds,
                           "micro_batch": self.micro})

    def halve_micro(self, step: int) -> int:
        """The OOM back-off: half the micro-batch from now on, noted for metrics.json. Returns the new size."""
        new = self.micro // 2
        self.oom_backoffs.append({"step": step, "from": self.micro, "to": new})
        self.micro = new
        return new

    def state_dict(self) -> dict:
        """A JSON-ready copy: what a checkpoint saves and run_metrics reads."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, saved: dict) -> TrainState:
        """The state a checkpoint saved; keys other than the state's (the fingerprint, the flags) are ignored.
        ValueError naming what is missing or of the wrong type."""
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(saved))
        if missing:
            raise ValueError(f"no {', '.join(missing)} in it")
        state = cls(**{k: v for k, v in saved.items() if k in names})
        wrong = [n for n, kind in (("step", int), ("micro", int), ("train", list), ("val", list),
                                   ("oom_backoffs", list), ("train_seconds", (int, float)))
                 if not isinstance(getattr(state, n), kind) or isinstance(getattr(state, n), bool)]
        if wrong or state.micro < 1 or state.step < 0:
            raise ValueError(f"{', '.join(wrong) or 'step/micro'} of the wrong type or range")
        return state


@dataclass(frozen=True)
class Schedule:
    """The run's fixed shape, from the flags and the number of training samples."""
    per_step: int                       # samples per optimizer step, all processes together
    steps_per_epoch: int
    total: int                          # optimizer steps of the whole run
    eval_every: int                     # validation loss every this many steps (and after the last)


@dataclass(frozen=True)
class Saving:
    """What the loop writes besides the weights' update: checkpoints and metrics.json in out_dir (None: nothing,
    e.g. benchmarks), each checkpoint with the fingerprint of the data order and the run's flags."""
    out_dir: Path | None
    fingerprint: dict
    flags: dict | None
    resumed_from: int | None            # the step a --resume continued from (None: started at step 0)
    t_start: float                      # time.perf_counter() when training began (metrics.json's wall time)
