"""Checkpoints: atomic, verified directories (`store`), their remote copies (`remote`), loading a run's model for
use (`load`) and foreign weights (`convert`: open_clip, OpenAI, Hugging Face). Imports base, text and models."""
