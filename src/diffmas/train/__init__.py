"""DiffMAS training: LoRA adapters trained through the multi-agent latent trajectory, and the
fair controls (sft_single, sft_text_mas) on the same data, steps and LoRA budget."""

from diffmas.train.config import TRAIN_METHODS, TrainConfig

__all__ = ["TRAIN_METHODS", "TrainConfig"]
