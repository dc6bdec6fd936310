"""Structured output by constrained decoding, with llguidance (a maintained grammar
engine): a JSON schema becomes a matcher that, before each sampled token, gives the
set of tokens that keep the output valid; disallowed tokens get -inf logits in the
executor, so even a 135M model returns JSON that parses and validates.

The llguidance tokenizer is built once per model from the GGUF vocabulary: each
token's bytes, with control tokens marked by a leading 0xff as llguidance expects.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from edgelm import _native


class GrammarError(ValueError):
    pass


class Grammars:
    def __init__(self, native: _native.Model, eog_ids: frozenset[int]) -> None:
        self._native = native
        self._eog = sorted(eog_ids)
        self._tok: Any = None
        self._lock = threading.Lock()
        self._prefix_masks: dict[bytes, list[np.ndarray]] = {}

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tok is None:
                import llguidance

                n = self._native.n_vocab
                tokens: list[bytes] = []
                for t in range(n):
                    special = self._native.token_bytes(t, True)
                    plain = self._native.token_bytes(t, False)
                    tokens.append(b"\xff" + special if special and not plain else special)
                native = self._native

                class _Vocab:
                    eos_token_id = native.eos if native.eos is not None else self._eog[0]
                    bos_token_id = native.bos
                    special_token_ids = [t for t in range(n) if tokens[t][:1] == b"\xff"]

                    def __init__(self) -> None:
                        self.tokens = tokens

                    def __call__(self, s: bytes) -> list[int]:
                        return native.tokenize(s.decode("utf-8", errors="replace"), False, False)

                self._tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()), eos_token=self._eog or None)
            return self._tok

    def json_schema(self, schema: dict[str, Any]) -> str:
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer())
        if is_error:
            raise GrammarError(f"invalid JSON schema: {'; '.join(messages)}")
        return str(grammar)

    def lark(self, source: str) -> str:
        """A Lark grammar (with inline `%json{...}` schemas), checked against the vocabulary."""
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_lark(source)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer())
        if is_error:
            raise GrammarError(f"invalid tool or response schema: {'; '.join(messages)}")
        return str(grammar)

    def prefix_masks(self, tag: bytes) -> list[np.ndarray]:
        """For k in 0..len(tag)-1, the tokens whose bytes begin `tag[k:]` (non-empty, and
        not running past it), as little-endian u32 bitmasks: what may continue a tag
        whose first k bytes are out. Cached per tag."""
        with self._lock:
            hit = self._prefix_masks.get(tag)
            if hit is not None:
                return hit
            n = self._native.n_vocab
            masks = [np.zeros((n + 31) // 32, dtype="<u4") for _ in tag]
            for t in range(n):
                b = self._native.token_bytes(t, True)
                if not b or b not in tag:
                    continue
                for k in range(len(tag)):
                    if tag.startswith(b, k):
                        masks[k][t >> 5] |= np.uint32(1 << (t & 31))
            self._prefix_masks[tag] = masks
            return masks

    def matcher(self, grammar: str) -> Any:
        import llguidance

        m = llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return m


ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
