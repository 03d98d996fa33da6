"""Caption generation for CoCa: greedy, beam search, top-k and top-p sampling.

The image tokens, and their keys and values in each decoder layer, are computed once per call. Each
step feeds only the newest token through the text tower and the decoder, which keep the keys and
values of the earlier positions (a key/value cache; beam search reorders it with the beams). With
`cache=False` every step recomputes the whole prefix instead, the plain computation the cache is
tested against.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Method = Literal["greedy", "beam", "top-k", "top-p"]
METHODS: tuple[str, ...] = ("greedy", "beam", "top-k", "top-p")


def generate(model, images: torch.Tensor, sot_id: int, method: Method = "greedy", max_length: int | None = None,
             beam_width: int = 4, length_penalty: float = 0.0, top_k: int = 50, top_p: float = 0.9,
             temperature: float = 1.0, generator: torch.Generator | None = None, cache: bool = True) -> torch.Tensor:
    """Token ids [B, T] of one caption per image: `sot_id`, the generated tokens, the end-of-text token
    (unless cut at `max_length`), then padding; T <= `max_length` (default and cap: the context length).

    greedy: the most likely token each step. beam: beam search keeping the `beam_width` likeliest
    live prefixes and the `beam_width` best finished captions, ranked by log-prob / generated
    tokens ** `length_penalty` (0: plain log-prob); like any beam search it usually, not always,
    finds a likelier caption than greedy search. top-k / top-p: sample from the `top_k` most likely
    tokens / the smallest set holding probability `top_p`, after dividing the logits by
    `temperature`, drawing from `generator`.
    Greedy and beam search are deterministic; beam search with width 1 is greedy search. `cache`: keep
    the prefix's keys and values (see the module docstring).
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
        image_tokens = image_tokens.repeat_interleave(beam_width, dim=0)
    prefixes = _Prefixes(model, image_tokens, cache)
    if method == "beam":
        return _beam(model, prefixes, sot_id, max_length, beam_width, length_penalty)
    sample = None
    if method != "greedy":
        sample = (lambda logp: _sample(logp / temperature, top_k if method == "top-k" else None,
                                       top_p if method == "top-p" else None, generator))
    return _step_by_step(model, prefixes, sot_id, max_length, sample)


class _Prefixes:
    """The prefixes being extended, one per row of `image_tokens`: log-probabilities of their next token."""

    def __init__(self, model, image_tokens: torch.Tensor, cache: bool):
        self.model, self.image_tokens = model, image_tokens
        self.state = model.start_decoding(image_tokens) if cache else None
        self.seen = 0                                    # prefix tokens already in the cache

    def next_logprobs(self, seqs: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [N, vocab] (float32) of the token after each prefix `seqs` [N, t] (which extends
        the previous call's prefixes by one token, after `reorder`)."""
        if self.state is None:
            logits = self.model.next_token_logits(self.image_tokens, seqs)[:, -1]
        else:
            logits = self.model.decode_step(seqs[:, self.seen:], self.state)
            self.seen = seqs.shape[1]
        return logits.float().log_softmax(dim=-1)

    def reorder(self, rows: torch.Tensor) -> None:
        """The prefixes go on from rows `rows` of the previous ones (beam search; within each image's rows)."""
        if self.state is not None:
            self.state.select(rows)


def _step_by_step(model, prefixes: _Prefixes, sot_id: int, max_length: int, sample) -> torch.Tensor:
    """Greedy decoding (`sample` None) or sampling, one token per step until every row has ended."""
    eot, pad = model.cfg.text.eot_token_id, model.cfg.text.pad_token_id
    device = prefixes.image_tokens.device
    b = prefixes.image_tokens.shape[0]
    seqs = torch.full((b, 1), sot_id, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    while seqs.shape[1] < max_length and not done.all():
        logp = prefixes.next_logprobs(seqs)
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


def _beam(model, prefixes: _Prefixes, sot_id: int, max_length: int, width: int,
          length_penalty: float) -> torch.Tensor:
    """Beam search. Each step scores every continuation of each image's `width` live beams by summed
    log-prob; candidates ending in end-of-text among the best `width` enter a pool of finished
    captions (the best `width` kept, ranked by log-prob / generated tokens ** `length_penalty`), and
    the best `width` that did not end stay live. It stops when no live beam can still beat the best
    finished caption, or at `max_length` (live beams then count as finished)."""
    eot, pad = model.cfg.text.eot_token_id, model.cfg.text.pad_token_id
    b, device = prefixes.image_tokens.shape[0] // width, prefixes.image_tokens.device
    first_row = torch.arange(b, device=device)[:, None] * width          # each image's first beam row
    seqs = torch.full((b, width, 1), sot_id, dtype=torch.long, device=device)
    scores = torch.full((b, width), float("-inf"), device=device)
    scores[:, 0] = 0.0                                                   # one live beam to start from
    done = torch.full((b, width, max_length), pad, dtype=torch.long, device=device)
    done_scores = torch.full((b, width), float("-inf"), device=device)
    positions = torch.arange(2 * width, device=device)
    while True:
        t = seqs.shape[2]                                                 # tokens so far, start token included
        logp = prefixes.next_logprobs(seqs.flatten(0, 1)).view(b, width, -1)
        top, index = (scores[..., None] + logp).flatten(1).topk(2 * width, dim=1)   # >= width of them go on
        beam, token = index // logp.shape[-1], index % logp.shape[-1]
        grown = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, t)), token[..., None]], dim=2)
        ended = token == eot
        entering = (ended & (positions < width)).float().log() + top / t ** length_penalty  # t generated tokens
        padded = F.pad(grown, (0, max_length - t - 1), value=pad)
        done_scores, keep = torch.cat([done_scores, entering], dim=1).topk(width, dim=1)
        done = torch.cat([done, padded], dim=1).gather(1, keep[..., None].expand(-1, -1, max_length))
        live = (positions + ended * 2 * width).argsort(dim=1, stable=True)[:, :width]  # best `width` not ended
        scores, seqs = top.gather(1, live), grown.gather(1, live[..., None].expand(-1, -1, t + 1))
        prefixes.reorder((first_row + beam.gather(1, live)).flatten())
        # log-probs only fall as a beam grows: a live beam ends at most at scores / (max_length - 1) ** penalty
        if t + 1 >= max_length or (done_scores.amax(1) >= scores.amax(1) / (max_length - 1) ** length_penalty).all():
            break
    live_ranked = scores / float(seqs.shape[2] - 1) ** length_penalty
    pool = torch.cat([done, F.pad(seqs, (0, max_length - seqs.shape[2]), value=pad)], dim=1)
    best = torch.cat([done_scores, live_ranked], dim=1).argmax(dim=1)
    chosen = pool[torch.arange(b, device=device), best]
    return chosen[:, :int(_lengths(chosen, eot).max()) + 1]


def _lengths(seqs: torch.Tensor, eot: int) -> torch.Tensor:
    """Generated tokens per sequence [..., T]: up to and including the first end-of-text (all, if none)."""
    t = seqs.shape[-1]
    positions = torch.arange(t, device=seqs.device)
    first = torch.where(seqs == eot, positions, torch.full_like(seqs, t - 1)).amin(dim=-1)
    return first  # the start token is at position 0, so the first eot's position is the count
