"""What a training run is made of, as one frozen value: the network, optimizer, schedule,
precision, objective and loop settings, plus the conditioning the model is trained at.

A `Session` keeps its spec for its whole life, so everything that describes the run afterwards
(the LoRA file's metadata, the report title, a resumable state) is read from the spec that
trained, never from whichever node happens to show the result.

Public API:
    TrainingSpec(network, optimizer, schedule, precision, objective, train, guidance)
        .parts() -> {"network": hash, ...}     one short hash per part (steps/epochs left out:
                                               training longer is the same run, not another one)
        .to_json() -> dict  /  TrainingSpec.from_json(dict)   for resumable states, no pickle
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

from .errors import ConfigError
from .network import NetworkConfig
from .objective import ObjectiveConfig
from .optimizers import OptimizerConfig
from .precision import PrecisionConfig
from .schedule import ScheduleConfig

@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500  # optimizer steps; 0 = derive from epochs
    epochs: int = 0  # used when steps == 0: epochs x (images x repeats / batch / accumulation)
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 42
    validation_split: float = 0.0  # fraction of images held out for validation loss
    validation_every: int = 0  # optimizer steps between validation passes; 0 = 10 passes per run
    max_bad_steps: int = 5  # consecutive non-finite steps before training stops
    lr_backoff: float = 0.5  # LR factor applied after each non-finite step
    snapshot_every: int = 20  # good steps between in-memory snapshots used to roll back after NaN

    def __post_init__(self):
        def whole(field, value, lo, hint):
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ConfigError(field, f"must be a whole number >= {lo}, got {value!r}; {hint}")

        whole("steps", self.steps, 0, "set the number of optimizer steps, or 0 to train by epochs.")
        whole("epochs", self.epochs, 0, "set epochs, or 0 to train by steps.")
        if self.steps == 0 and self.epochs == 0:
            raise ConfigError("steps", "steps and epochs are both 0: set one of them (e.g. steps 1000, or epochs 10).")
        whole("batch_size", self.batch_size, 1, "1-4 is typical on consumer GPUs.")
        whole("gradient_accumulation", self.gradient_accumulation, 1, "1 = update every batch.")
        whole("seed", self.seed, 0, "any non-negative number.")
        whole("validation_every", self.validation_every, 0, "0 = automatic.")
        whole("max_bad_steps", self.max_bad_steps, 1, "5 is a sensible default.")
        whole("snapshot_every", self.snapshot_every, 1, "20 is a sensible default.")
        if not 0.0 <= self.validation_split < 0.5:
            raise ConfigError("validation_split", f"must be in [0, 0.5), got {self.validation_split!r}; 0.1 holds out 10% of the images.")
        if not 0.0 < self.lr_backoff <= 1.0:
            raise ConfigError("lr_backoff", f"must be in (0, 1], got {self.lr_backoff!r}.")


_PARTS = {
    "network": NetworkConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "precision": PrecisionConfig,
    "objective": ObjectiveConfig,
    "train": TrainConfig,
}


def _short_hash(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainingSpec:
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guidance: float = 1.0  # the guidance value a guidance-distilled model (Flux-dev) is conditioned on

    def __post_init__(self):
        for name, cls in _PARTS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"TrainingSpec.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        g = self.guidance
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ConfigError("guidance", f"expected a number >= 0, got {g!r}; 1.0 is the usual value for Flux-dev LoRAs.")

    def parts(self) -> dict[str, str]:
        """A hash per part, for telling the user *which* part changed. The run's length (steps,
        epochs) is not part of it: queueing again for more steps continues the same LoRA."""
        out = {name: _short_hash(asdict(getattr(self, name))) for name in _PARTS if name != "train"}
        out["training"] = _short_hash({**asdict(self.train), "steps": 0, "epochs": 0})
        out["guidance"] = _short_hash(self.guidance)
        return out

    def to_json(self) -> dict:
        return {**{name: asdict(getattr(self, name)) for name in _PARTS}, "guidance": self.guidance}

    @classmethod
    def from_json(cls, data: dict) -> "TrainingSpec":
        try:
            parts = {}
            for name, part in _PARTS.items():
                known = {f.name for f in fields(part)}
                parts[name] = part(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data[name].items() if k in known})
            return cls(**parts, guidance=float(data.get("guidance", 1.0)))
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError("state", f"the saved training settings are incomplete ({e}); the state file is damaged or from another program.") from None

    def with_steps(self, steps: int, epochs: int = 0) -> "TrainingSpec":
        return replace(self, train=replace(self.train, steps=steps, epochs=epochs))
