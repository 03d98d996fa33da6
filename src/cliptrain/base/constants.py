"""Constants shared by several modules (one definition each)."""

# Per-channel pixel statistics OpenAI's CLIP normalises with.
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
