"""Caption generation for CoCa: greedy, beam search, top-k and top-p sampling.

Every step runs the text tower and the decoder on the whole prefix (no key/value cache: captions
are short, and this keeps one code path for training and generation); the image tokens are
computed once per call.
"""
from __future__ import annotations

from typing import Literal

import torch

Method = Literal["greedy", "beam", "top-k", "top-p"]
METHODS: tuple[str, ...] = ("greedy", "beam", "top-k", "top-p")


def generate(model, images: torch.Tensor, sot_id: int, method: Method = "greedy", max_length: int | None = None,
             beam_width: int = 4, length_penalty: float = 0.0, top_k: int = 50, top_p: float = 0.9,
             temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [B, T] of one caption per image: `sot_id`, the generated tokens, the end-of-text token
    (unless cut at `max_length`), then padding; T <= `max_length` (default and cap: the context length).

    greedy: the most likely token each step. beam: the best of `beam_width` hypotheses kept by summed
    log-probability; finished ones are ranked by log-prob / length ** `length_penalty` (0: plain
    log-prob). top-k / top-p: sample from the `top_k` most likely tokens / the smallest set holding
    probability `top_p`, after dividing the logits by `temperature`, drawing from `generator`.
    Greedy and beam search are deterministic; beam search with width 1 is greedy search.
    """
    text = model.cfg.text
    max_length = min(max_length or text.context_length, text.context_length)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (the start token and one more), got {max_length}")
    if method not in METHODS:
        raise ValueError(f"unknown generation method {method!r}; choose one of {', '.join(METHODS)}")
    if temperature <= 0 or top_k < 1 or not 0 < top_p <= 1 or beam_width < 1:
        raise ValueError("generation needs temperature > 0, top_k >= 1, 0 < top_p <= 1 and beam_width >= 1")
    image_tokens = model.image_tokens(images)
    if method == "beam":
        return _beam(model, image_tokens, sot_id, max_length, beam_width, length_penalty)
    sample = None
    if method != "greedy":
        sample = (lambda logp: _sample(logp / temperature, top_k if method == "top-k" else None,
                                       top_p if method == "top-p" else None, generator))
    return _step_by_step(model, image_tokens, sot_id, max_length, sample)


def _next_logprobs(model, image_tokens: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [N, vocab] (float32) of the token after each prefix [N, t]."""
    return model.next_token_logits(image_tokens, prefix)[:, -1].float().log_softmax(dim=-1)


def _step_by_step(model, image_tokens: torch.Tensor, sot_id: int, max_length: int, sample) -> torch.Tensor:
    """Greedy decoding (`sample` None) or sampling, one token per step until every row has ended."""
    eot, pad = model.cfg.text.eot_token_id, model.cfg.text.pad_token_id
    b = image_tokens.shape[0]
    seqs = torch.full((b, 1), sot_id, dtype=torch.long, device=image_tokens.device)
    done = torch.zeros(b, dtype=torch.bool, device=image_tokens.device)
    while seqs.shape[1] < max_length and not done.all():
        logp = _next_logprobs(model, image_tokens, seqs)
        token = logp.argmax(dim=-1) if sample is None else sample(logp)
        token = torch.where(done, torch.full_like(token, pad), token)
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        done |= token == eot
    return seqs


def _sample(logits: torch.Tensor, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """One token per row drawn from the softmax of `logits` restricted to its top-k or top-p set."""
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # keep a token if the tokens ranked above it hold less than top_p (the most likely always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _beam(model, image_tokens: torch.Tensor, sot_id: int, max_length: int, width: int,
          length_penalty: float) -> torch.Tensor:
    """Beam search: each step keeps the `width` best continuations (by summed log-prob) of every image's
    beams; a finished beam stays a candidate unchanged (extended with padding at log-prob 0)."""
    eot, pad = model.cfg.text.eot_token_id, model.cfg.text.pad_token_id
    b, device = image_tokens.shape[0], image_tokens.device
    image_tokens = image_tokens.repeat_interleave(width, dim=0)
    seqs = torch.full((b, width, 1), sot_id, dtype=torch.long, device=device)
    scores = torch.full((b, width), float("-inf"), device=device)
    scores[:, 0] = 0.0                                        # one live beam to start from
    finished = torch.zeros(b, width, dtype=torch.bool, device=device)
    while seqs.shape[2] < max_length and not finished.all():
        logp = _next_logprobs(model, image_tokens, seqs.flatten(0, 1)).view(b, width, -1)
        vocab = logp.shape[-1]
        stay = torch.full_like(logp, float("-inf"))
        stay[..., pad] = 0.0
        candidates = scores[..., None] + torch.where(finished[..., None], stay, logp)
        scores, index = candidates.flatten(1).topk(width, dim=1)        # sorted, best first
        beam, token = index // vocab, index % vocab
        seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, seqs.shape[2])), token[..., None]], dim=2)
        finished = finished.gather(1, beam) | (token == eot)
        if not length_penalty and _settled(scores, finished):
            break
    lengths = _lengths(seqs, eot)
    ranked = scores / lengths.float() ** length_penalty if length_penalty else scores
    best = ranked.argmax(dim=1)
    rows = torch.arange(b, device=device)
    return seqs[rows, best, :int(lengths[rows, best].max()) + 1]


def _settled(scores: torch.Tensor, finished: torch.Tensor) -> bool:
    """Whether every image's best finished beam scores at least its best live one: log-probs only fall
    as a beam grows, so (ranking by plain log-prob) no live beam can overtake it."""
    best_done = scores.masked_fill(~finished, float("-inf")).amax(dim=1)
    best_live = scores.masked_fill(finished, float("-inf")).amax(dim=1)
    return bool((best_done >= best_live).all())


def _lengths(seqs: torch.Tensor, eot: int) -> torch.Tensor:
    """Generated tokens per sequence [..., T]: up to and including the first end-of-text (all, if none)."""
    t = seqs.shape[-1]
    positions = torch.arange(t, device=seqs.device)
    first = torch.where(seqs == eot, positions, torch.full_like(seqs, t - 1)).amin(dim=-1)
    return first  # the start token is at position 0, so the first eot's position is the count
