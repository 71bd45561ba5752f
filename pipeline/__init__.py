"""Rollouts and samplers: (generator, scheduler, noise, conditioning) -> latents."""

from .causal_diffusion_inference import CausalDiffusionInferencePipeline
from .causal_inference import CausalInferencePipeline
from .common import BlockOutput, InferenceOutput
from .self_forcing_training import RolloutOutput, SelfForcingTrainingPipeline

__all__ = [
    "BlockOutput",
    "CausalDiffusionInferencePipeline",
    "CausalInferencePipeline",
    "InferenceOutput",
    "RolloutOutput",
    "SelfForcingTrainingPipeline",
]
