"""Token generation on a cache whose positions may have gaps, as a stream of text deltas.

Streaming and non-streaming answers come from this one generator: a non-streamed answer
is the concatenation of the deltas, so the two can never disagree. Token picking, stop
strings, EOS and detokenizing live here, once; what runs one token through the model is a
``Decoder``, which a method may replace (decode-time retrieval or correction).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from samkv_integrations.models.compat import with_cache


@dataclass(slots=True)
class GenerationOptions:
    """How to pick tokens and when to stop.

    Attributes:
        max_new_tokens: Upper bound on generated tokens.
        min_new_tokens: EOS is not picked before this many tokens (as transformers'
            ``min_new_tokens``); stop strings still end the answer. Load tests set it to
            ``max_new_tokens`` so that every answer does the same work.
        temperature: 0 for greedy decoding; above 0 samples from the tempered distribution.
        top_p: Nucleus sampling mass (with ``temperature > 0``).
        seed: Seed for sampling, for reproducible samples.
        stop: Strings that end the answer; the answer is cut before the first one.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.min_new_tokens, bool) or not isinstance(self.min_new_tokens, int):
            raise TypeError(f"min_new_tokens must be an int, got {self.min_new_tokens!r}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in 0..max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}"
            )
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if isinstance(self.stop, bytes) or not isinstance(self.stop, Sequence):
            raise TypeError(f"stop must be a string or a sequence of strings, got {self.stop!r}")
        if any(not isinstance(s, str) for s in self.stop):
            raise TypeError(f"stop must hold strings, got {list(self.stop)!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass(frozen=True, slots=True)
class GreedyRun:
    """What a decoder that picks greedy tokens itself must know (``Decoder.run_ahead``).

    Attributes:
        tokens: Most tokens to pick; the stream ends sooner at an EOS id.
        eos: The ids that end the answer (the stream yields the EOS, then ends).
        eos_masked: How many of the first picks may not be EOS (``min_new_tokens``).
    """

    tokens: int
    eos: frozenset[int]
    eos_masked: int = 0


class Decoder:
    """Runs one answer token through the model on the decode cache: the plain default.

    A method that decodes differently subclasses it and returns an instance from
    ``BaseMethod.decoder``. One instance serves one answer, so it may keep per-answer state.
    """

    def step(
        self, model: PreTrainedModel, cache: DynamicCache, token: int, position: int
    ) -> torch.Tensor:
        """Feed one token and return the logits for the next one.

        Args:
            model: The model.
            cache: The decode cache (``[1, n_kv_heads, cache_len, head_dim]`` per layer); the
                token's KV is appended to it in place.
            token: The token id just generated.
            position: Its global position (positions may have gaps before it).

        Returns:
            ``[vocab]`` logits for the token after it.
        """
        out = model(
            input_ids=torch.tensor([[token]], device=model.device),
            position_ids=torch.tensor([[position]], device=model.device),
            **with_cache(model, cache),
            use_cache=True,
        )
        return out.logits[0, -1]

    def hand_back(self, cache: DynamicCache) -> None:
        """Leave the KV of every step taken so far in ``cache``, for another decoder.

        An answer joining the decode batch (``batching``) goes on from ``cache``, ``[1,
        n_kv_heads, n, head_dim]`` per layer. The plain step extends ``cache`` in place, so
        here there is nothing to do; a decoder that writes elsewhere points it back.
        """

    def run_ahead(
        self, model: PreTrainedModel, cache: DynamicCache, token: int, position: int, run: GreedyRun
    ) -> Iterator[int] | None:
        """The greedy tokens after ``token``, picked by the decoder itself, or ``None``.

        ``generate_deltas`` asks before each greedy step. A decoder that picks tokens where
        it runs them (the decode batcher: one argmax for every answer in the batch, the next
        step launched before the answers' threads read theirs) returns them as a stream,
        ``token`` fed at ``position`` first; the plain decoder returns ``None``, and the
        caller steps and picks one token at a time.
        """
        return None

    def graph_twin(self, max_new_tokens: int) -> Decoder | None:
        """A decoder running these same steps on a static cache as a CUDA graph, or None.

        ``static_decode.with_graphs`` asks for it when the engine decodes with CUDA graphs:
        the plain step's twin is ``StaticDecoder``; a method's decoder offers one only where
        its step is capturable (fixed shapes, nothing read back to the host mid-step).
        """
        return None


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token id that ends generation (tokenizer EOS and the generation config's)."""
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


def _pick(
    logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None
) -> int:
    if options.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / options.temperature, dim=-1)
    if options.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= options.top_p
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


def _cut_at_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


@torch.inference_mode()
def generate_deltas(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cache: DynamicCache,
    first_logits: torch.Tensor,
    next_position: int,
    options: GenerationOptions,
    generated_ids: list[int] | None = None,
    decoder: Decoder | None = None,
) -> Iterator[str]:
    """Generate from a filled cache, yielding text deltas.

    Args:
        model: The model.
        tokenizer: Its tokenizer (for detokenizing).
        cache: The cache after the question prefill; it is extended in place.
        first_logits: ``[vocab]`` logits for the first answer token.
        next_position: Global position of the first answer token (positions may have
            gaps before it; cache indices and positions are independent).
        options: Sampling and stopping.
        generated_ids: If given, receives the generated token ids.
        decoder: What runs each generated token through the model (default: ``Decoder()``).

    Yields:
        Pieces of text whose concatenation is the answer.
    """
    eos = eos_token_ids(model, tokenizer)
    generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
    ids: list[int] = [] if generated_ids is None else generated_ids
    holdback = max((len(s) for s in options.stop), default=1) - 1
    emitted = 0
    text = ""
    tokens = _picked_tokens(
        model, cache, first_logits, next_position, options, eos, generator, decoder or Decoder()
    )
    with contextlib.closing(tokens):
        for token in tokens:
            if token in eos:
                break
            ids.append(token)
            text = str(tokenizer.decode(ids, skip_special_tokens=True))
            cut = _cut_at_stop(text, options.stop)
            if cut is not None:
                if cut > emitted:
                    yield text[emitted:cut]
                return
            # Hold back what could still become a stop string or a multi-byte character.
            safe = len(text) - holdback
            while safe > emitted and text[safe - 1] == "\ufffd":
                safe -= 1
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
    if len(text) > emitted:
        yield text[emitted:]


def _picked_tokens(
    model: PreTrainedModel,
    cache: DynamicCache,
    logits: torch.Tensor,
    position: int,
    options: GenerationOptions,
    eos: set[int],
    generator: torch.Generator | None,
    decoder: Decoder,
) -> Generator[int, None, None]:
    """The answer's tokens, an EOS last if one is picked.

    Each step here runs only when the next token is asked for. Greedy answers go over to
    ``decoder.run_ahead`` where it offers a stream, which may run ahead of the reader (the
    decode batch's worker does, until the answer ends or is closed).
    """
    # EOS ids to mask while min_new_tokens holds them back (built only then: a copy to the device).
    eos_index = (
        torch.tensor(sorted(eos), dtype=torch.long, device=logits.device)
        if options.min_new_tokens and eos
        else None
    )
    for step in range(options.max_new_tokens):
        if eos_index is not None and step < options.min_new_tokens:
            logits = logits.index_fill(0, eos_index, -math.inf)
        token = _pick(logits, options, generator)
        yield token
        left = options.max_new_tokens - step - 1
        if token in eos or not left:
            return
        if options.temperature == 0:
            held = max(0, options.min_new_tokens - step - 1) if eos else 0  # none to hold back
            run = GreedyRun(left, frozenset(eos), held)
            stream = decoder.run_ahead(model, cache, token, position, run)
            if stream is not None:
                yield from stream
                return
        logits = decoder.step(model, cache, token, position)
        position += 1
