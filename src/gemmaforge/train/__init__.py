"""Training: one ``Trainer`` for every layout, one ``forward_backward`` step, objectives, checkpoints."""

from .config import TrainConfig, load_recipe
from .metrics import plot_metrics, read_metrics
from .objectives import CausalLMLoss
from .step import StepLayout, StepResult, forward_backward
from .trainer import Trainer, TrainingStopped

__all__ = ["TrainConfig", "load_recipe", "Trainer", "TrainingStopped", "forward_backward", "StepLayout",
           "StepResult", "CausalLMLoss", "read_metrics", "plot_metrics"]
