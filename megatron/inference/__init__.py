"""Inference: load a model from any checkpoint layout, sample text, serve it over HTTP."""
from megatron.inference.generation import generate, generate_tokens
from megatron.inference.loader import InferenceModel, load_inference_model

__all__ = ["generate", "generate_tokens", "InferenceModel", "load_inference_model"]
