"""The Python face of a loaded model.

`Model` wraps `edgelm._native.Model`: it adds numpy arrays, stop strings and a typed
`Token` record; all compute happens in Rust with the GIL released.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from edgelm import _native
from edgelm._native import SamplingParams
from edgelm.stops import StopMatcher


@dataclass(frozen=True)
class Token:
    """One generated token."""

    id: int
    #: Text this token completes; empty while a multi-byte character is incomplete.
    text: str
    #: log p(token) under the model's raw distribution.
    logprob: float
    #: The most likely alternatives, best first, as (token id, logprob).
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    #: "stop" or "length" on the final token, else None.
    finish_reason: str | None = None


class Model:
    """A GGUF model: memory-mapped, validated, ready to run.

    Args:
        path: a GGUF file.
        n_threads: compute threads (default: physical cores).
        kernel_level: force a CPU kernel level ("scalar", "avx2", "avx512", "neon",
            "dotprod", "i8mm"); default: the best this CPU has (EDGELM_KERNEL_LEVEL lowers it).
        n_ctx: tokens per sequence you will run (default: the model's context length).
            Only LongRoPE models (Phi-3.5/Phi-4-mini) depend on it: above their original
            context they take the long RoPE factors, as llama.cpp does for its context.

    Raises:
        GGUFFormatError: the file is not valid GGUF (the message names the defect).
        ModelLoadError: the file is valid but cannot be run (e.g. unsupported architecture).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_threads: int | None = None,
        kernel_level: str | None = None,
        n_ctx: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._m = _native.Model(self.path, n_threads, kernel_level, n_ctx)

    # -- facts -----------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self._m.architecture

    @property
    def n_vocab(self) -> int:
        return self._m.n_vocab

    @property
    def n_ctx_train(self) -> int:
        return self._m.n_ctx_train

    @property
    def n_threads(self) -> int:
        return self._m.n_threads

    @property
    def kernel_level(self) -> str:
        """The CPU kernel level in use."""
        return self._m.kernel_level

    @property
    def native(self) -> _native.Model:
        """The underlying native model (for the serving engine)."""
        return self._m

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """All GGUF metadata (arrays as lists; computed once)."""
        return self._m.metadata()

    def tensors(self) -> list[tuple[str, list[int], str, int]]:
        """(name, dims, type, bytes) for every tensor in the file."""
        return self._m.tensors()

    # -- text ------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids for `text`. `add_special` adds BOS/EOS as the model's file says;
        `parse_special` turns special-token texts such as "<|im_start|>" into their ids."""
        return self._m.tokenize(text, add_special, parse_special)

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        """Text for `ids`; control tokens render only with `special=True`."""
        return self._m.detokenize(list(ids), special)

    # -- compute ---------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """Logits for every position of one sequence: shape (len(ids), n_vocab)."""
        raw = self._m.logits_bytes(list(ids))
        return np.frombuffer(raw, dtype=np.float32).reshape(len(ids), self.n_vocab)

    @property
    def is_embedding(self) -> bool:
        """Whether this model embeds: an encoder (bert, nomic-bert), or a decoder whose
        file sets a pooling type (Qwen3-Embedding)."""
        return self._m.is_embedding

    def embed(
        self, inputs: str | Sequence[str] | Sequence[Sequence[int]], normalize: bool = True
    ) -> npt.NDArray[np.float32]:
        """One vector per input, shape (n_inputs, n_embd): texts are tokenized as
        llama.cpp's embedding tools do (the model's special tokens added, special-token
        texts parsed), token-id lists are used as given. Pooled as the file says;
        `normalize` scales each vector to unit length. All inputs run as one batch, so
        each must fit the model's context (InvalidRequestError otherwise)."""
        items: list[str | Sequence[int]] = [inputs] if isinstance(inputs, str) else list(inputs)
        seqs = [self.tokenize(x, True, True) if isinstance(x, str) else [int(t) for t in x] for x in items]
        raw = self._m.embed_bytes(seqs)
        out = np.frombuffer(raw, dtype=np.float32).reshape(len(seqs), self._m.n_embd).copy()
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def perplexity(self, text_or_ids: str | Sequence[int], n_ctx: int = 256) -> float:
        """Perplexity as llama-perplexity computes it (chunks of `n_ctx`, second half scored)."""
        ids = self.tokenize(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        ppl, _, _ = self._m.perplexity(ids, n_ctx)
        return ppl

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        sampling: SamplingParams | None = None,
        logprobs: int = 0,
        stop: Sequence[str] = (),
        stop_tokens: Sequence[int] = (),
        add_special: bool = True,
        **settings: Any,
    ) -> Iterator[Token]:
        """Generate a continuation, one `Token` at a time.

        `prompt` is text (tokenized with `add_special`) or token ids. How tokens are
        drawn is a `SamplingParams` (`sampling`; default: its defaults), with any of its
        settings given by name on top (`temperature=0` is greedy; `logprobs` is
        `n_logprobs`). Generation ends at an end-of-generation token, a stop token, a
        stop string (not included in the output) or after `max_tokens`.
        """
        ids = self.tokenize(prompt, add_special) if isinstance(prompt, str) else list(prompt)
        if logprobs:
            settings["n_logprobs"] = logprobs
        params = sampling.replace(**settings) if sampling is not None else SamplingParams(**settings)
        gen = self._m.generate(ids, params, max_tokens=max_tokens, stop_tokens=list(stop_tokens))
        matcher = StopMatcher(list(stop))
        for tid, text, lp, top, finish in gen:
            out = matcher.push(text)
            if matcher.stopped:
                yield Token(tid, out, lp, top, "stop")
                return
            if finish is not None:
                out += matcher.flush()
            yield Token(tid, out, lp, top, finish)

    def generate_text(self, prompt: str | Sequence[int], **kwargs: Any) -> str:
        """The whole continuation as one string (see `generate`)."""
        return "".join(t.text for t in self.generate(prompt, **kwargs))
