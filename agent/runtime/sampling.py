"""Sampling for the llama.cpp backend: one generation's sampler chain.

The chain is built here from llama.cpp's sampler API rather than by
``Llama.generate`` because a continuation (a job moved here from a lost node)
must start from the sampler state the uninterrupted run had after the
delivered tokens: the grammar of a JSON response has consumed the delivered
prefix (otherwise it would demand a new document from scratch), and the
presence/frequency penalties have counted its tokens. Each delivered token is
passed to ``llama_sampler_accept``, exactly as sampling it would have been.

The chain mirrors what ``Llama.generate`` builds for the OpenAI parameters:
logit biases, penalties, grammar, then greedy at temperature 0, else top-p,
temperature and a seeded draw (top-k, typical and min-p neutral).
"""

from __future__ import annotations

import ctypes
import random
import re
from dataclasses import dataclass

import llama_cpp
import llama_cpp.llama_cpp as llama_lib

from agent.runtime.base import InvalidRequest
from agent.runtime.json_grammar import JSON_OBJECT_GBNF, json_schema_grammar
from core.inference import ResponseFormatType, Sampling
from core.request_limits import LOGIT_BIAS_FIELD, SCHEMA_FIELD

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 1.0
# llama.cpp treats seed 0xFFFFFFFF as "pick a random seed"; explicit seeds avoid it.
_SEED_MODULUS = 0xFFFFFFFF
_GRAMMAR_ROOT = b"root"


@dataclass(frozen=True, slots=True)
class Grammar:
    """A GBNF grammar the output must follow; with a ``trigger``, lazily: only from
    where the output first contains that text (the text included)."""

    text: str
    trigger: str = ""
    # The request field the grammar comes from, named when it does not compile.
    param: str = SCHEMA_FIELD


def grammar_for(sampling: Sampling) -> Grammar | None:
    """The grammar that enforces the requested output format (converting a large
    schema may take a while, hence before a slot is taken)."""
    response_format = sampling.response_format
    kind = None if response_format is None else response_format.type
    try:
        if kind is ResponseFormatType.JSON_OBJECT:
            return Grammar(JSON_OBJECT_GBNF)
        if kind is ResponseFormatType.JSON_SCHEMA and response_format is not None:
            return Grammar(json_schema_grammar(response_format.json_schema))
    except Exception as exc:  # the converter raises assorted errors on schemas it cannot do
        raise InvalidRequest(f"unsupported JSON schema: {exc}", SCHEMA_FIELD) from exc
    return None


class SamplerChain:
    """A llama.cpp sampler chain, owned by one generation and freed with it."""

    def __init__(self, llama: llama_cpp.Llama, sampling: Sampling, grammar: Grammar | None) -> None:
        temperature = DEFAULT_TEMPERATURE if sampling.temperature is None else sampling.temperature
        top_p = DEFAULT_TOP_P if sampling.top_p is None else sampling.top_p
        seed = random.getrandbits(31) if sampling.seed is None else sampling.seed % _SEED_MODULUS
        vocab_size = llama.n_vocab()
        unknown = [token for token, _ in sampling.logit_bias if token >= vocab_size]
        if unknown:
            # Token ids are the model's: only the node knows its vocabulary.
            raise InvalidRequest(
                f"logit_bias token {unknown[0]} is not in the model's vocabulary "
                f"(ids 0 to {vocab_size - 1})",
                LOGIT_BIAS_FIELD,
            )
        self._chain = llama_lib.llama_sampler_chain_init(
            llama_lib.llama_sampler_chain_default_params()
        )
        if sampling.logit_bias:
            # First, as in llama.cpp's own chain: the biases shift the raw logits.
            biases = (llama_lib.llama_logit_bias * len(sampling.logit_bias))(
                *(llama_lib.llama_logit_bias(token, bias) for token, bias in sampling.logit_bias)
            )
            self._add(
                llama_lib.llama_sampler_init_logit_bias(
                    vocab_size, len(sampling.logit_bias), biases
                )
            )
        # The penalties look at the last_n_tokens_size (64) most recent tokens.
        self._add(
            llama_lib.llama_sampler_init_penalties(
                vocab_size,
                llama.last_n_tokens_size,
                1.0,
                sampling.frequency_penalty or 0.0,
                sampling.presence_penalty or 0.0,
            )
        )
        if grammar is not None:
            compiled = _compile(llama, grammar)
            if not compiled:
                self.close()
                # Bounded schemas compile (core/request_limits.py); what still fails is
                # a construct llama.cpp's grammar does not take: the caller's to fix.
                raise InvalidRequest(
                    f"the grammar built from {grammar.param} could not be compiled",
                    grammar.param,
                )
            self._add(compiled)
        if temperature <= 0.0:
            self._add(llama_lib.llama_sampler_init_greedy())
        else:
            self._add(llama_lib.llama_sampler_init_top_p(top_p, 1))
            self._add(llama_lib.llama_sampler_init_temp(temperature))
            self._add(llama_lib.llama_sampler_init_dist(seed))

    def _add(self, sampler: llama_lib.llama_sampler_p) -> None:
        llama_lib.llama_sampler_chain_add(self._chain, sampler)

    def accept(self, token: int) -> None:
        llama_lib.llama_sampler_accept(self._chain, token)

    def sample(self, ctx: llama_lib.llama_context_p, row: int) -> int:
        """A token from the last decode's logits ``row`` (the chain accepts it)."""
        token: int = llama_lib.llama_sampler_sample(self._chain, ctx, row)
        return token

    def close(self) -> None:
        if self._chain is not None:
            llama_lib.llama_sampler_free(self._chain)
            self._chain = None


def _compile(llama: llama_cpp.Llama, grammar: Grammar) -> llama_lib.llama_sampler_p:
    vocab = llama_lib.llama_model_get_vocab(llama.model)
    compiled: llama_lib.llama_sampler_p
    if not grammar.trigger:
        compiled = llama_lib.llama_sampler_init_grammar(vocab, grammar.text.encode(), _GRAMMAR_ROOT)
    else:
        # A trigger is a regular expression to llama.cpp; the text is matched literally.
        patterns = (ctypes.c_char_p * 1)(re.escape(grammar.trigger).encode())
        compiled = llama_lib.llama_sampler_init_grammar_lazy_patterns(
            vocab, grammar.text.encode(), _GRAMMAR_ROOT, patterns, 1, None, 0
        )
    return compiled
