"""Rollouts and samplers: (generator, scheduler, noise, conditioning) -> latents."""

from .bidirectional_inference import BidirectionalSampler, SampleOutput
from .causal_diffusion_inference import CausalDiffusionInferencePipeline
from .causal_inference import CausalInferencePipeline
from .common import BlockOutput, InferenceOutput
from .self_forcing_training import RolloutOutput, SelfForcingTrainingPipeline

__all__ = [
    "BidirectionalSampler",
    "BlockOutput",
    "CausalDiffusionInferencePipeline",
    "CausalInferencePipeline",
    "InferenceOutput",
    "RolloutOutput",
    "SampleOutput",
    "SelfForcingTrainingPipeline",
]
