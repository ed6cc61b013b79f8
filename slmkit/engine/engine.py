"""``slmkit.Engine``: batched and streaming generation over a paged KV cache.

    engine = slmkit.Engine(model)                       # any model load_model returns
    outs = engine.generate(["Hello", "Bonjour"], SamplingParams(max_tokens=64))
    for delta in engine.stream("Tell me a story", SamplingParams(temperature=0.8, seed=1)):
        print(delta.text, end="", flush=True)

The engine owns the cache (sized by a fraction of free device memory or a block count), the
continuous-batching scheduler and the model runner (CUDA graphs for decode on GPUs; plain PyTorch on
CPU). Greedy outputs equal transformers' ``generate`` on the same model.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import os
import time
from typing import Iterator

import torch
from torch import nn

from slmkit.config import BaseConfig, ConfigError, check_type
from slmkit.engine.kv_cache import BlockAllocator, allocate_layer_caches, block_hash, bytes_per_block
from slmkit.engine.runner import Batch, ModelRunner
from slmkit.engine.sampling import SamplingParams, sample_tokens
from slmkit.engine.scheduler import Scheduler, Sequence
from slmkit.engine.speculative import NgramIndex, accept_greedy
from slmkit.errors import SlmkitError
from slmkit.kernels._launch import HAVE_TRITON
from slmkit.models.arch import attention_shape, blocks, context_length, get_spec
from slmkit.models.record import get_record, require_model

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


# the prefix-cache chain of LongRoPE sequences longer than the switch length (token -1 never occurs)
LONG_ROPE_ROOT = block_hash(None, (-1,))


@dataclasses.dataclass
class EngineConfig(BaseConfig):
    """Cache, batching and execution settings of an :class:`Engine`.

    Args:
        block_size: tokens per KV-cache block (a power of 2).
        num_blocks: cache size in blocks; None sizes it from ``memory_fraction``.
        memory_fraction: share of the device's free memory (after the weights) the cache may take; None:
            0.5 on CUDA, 0.1 of available RAM on CPU.
        max_batch_size: sequences decoding at once at most.
        max_num_batched_tokens: tokens one step processes at most (prompt chunks + decodes).
        max_model_len: prompt + output tokens per request at most; None: the model's limit, capped at 8192.
        prefix_caching: reuse cached blocks of identical prompt prefixes.
        cuda_graphs: capture the decode step in CUDA graphs (CUDA with Triton only).
        graph_batch_sizes: batch sizes to capture; None: powers of two and steps up to max_batch_size.
        use_kernels: the fused Triton kernels; None: on CUDA when Triton is installed.
        seed: seeds requests that give no seed of their own.
        speculative_tokens: prompt-lookup speculative decoding (:mod:`slmkit.engine.speculative`): up to this
            many draft tokens per step for greedy requests without a repetition penalty, verified in one
            forward pass (same tokens, fewer passes when the text repeats itself); 0 is off.
        speculative_ngram: the longest n-gram the drafts are looked up by.
    """

    name = "engine"

    block_size: int = 16
    num_blocks: int | None = None
    memory_fraction: float | None = None
    max_batch_size: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    prefix_caching: bool = True
    cuda_graphs: bool = True
    graph_batch_sizes: list[int] | None = None
    use_kernels: bool | None = None
    seed: int = 0
    speculative_tokens: int = 0
    speculative_ngram: int = 3

    def __post_init__(self):
        for field in ("block_size", "max_batch_size", "max_num_batched_tokens", "seed", "speculative_tokens",
                      "speculative_ngram"):
            check_type(field, getattr(self, field), int)
        for field in ("num_blocks", "max_model_len"):
            if getattr(self, field) is not None:
                check_type(field, getattr(self, field), int)
        if self.memory_fraction is not None:
            check_type("memory_fraction", self.memory_fraction, (int, float))
        for field in ("prefix_caching", "cuda_graphs"):
            check_type(field, getattr(self, field), bool)
        if self.use_kernels is not None:
            check_type("use_kernels", self.use_kernels, bool)
        if self.graph_batch_sizes is not None and (
                not isinstance(self.graph_batch_sizes, (list, tuple))
                or not all(isinstance(b, int) and not isinstance(b, bool) for b in self.graph_batch_sizes)):
            raise ConfigError(f"graph_batch_sizes must be a list of batch sizes, got {self.graph_batch_sizes!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of 2, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ConfigError(f"num_blocks must be at least 2, got {self.num_blocks}")
        if self.memory_fraction is not None and not 0.0 < self.memory_fraction <= 1.0:
            raise ConfigError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.max_batch_size < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("max_batch_size and max_num_batched_tokens must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if not 0 <= self.speculative_tokens <= 64:
            raise ConfigError(f"speculative_tokens must be in 0..64 (0: off), got {self.speculative_tokens}")
        if self.speculative_ngram < 1:
            raise ConfigError(f"speculative_ngram must be at least 1, got {self.speculative_ngram}")


@dataclasses.dataclass
class StreamDelta:
    """What one step added to a request: new token ids and the text they complete."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
    """A finished request: its tokens, text, why it stopped, and its timings (seconds)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    cached_prompt_tokens: int
    ttft: float  # arrival → first token
    token_times: list[float]  # perf_counter time of every token

    @property
    def inter_token_latencies(self) -> list[float]:
        """Gaps between consecutive tokens."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _max_model_len(config, limit: int | None) -> int:
    model_limit = context_length(config) or 8192
    window = getattr(config, "sliding_window", None)
    # configs with layer_types say which layers slide (the runner applies their windows); others, such as
    # Mistral's, slide in every layer: there requests stay within the window, where attention is full
    if window and getattr(config, "use_sliding_window", True) and not getattr(config, "layer_types", None):
        model_limit = min(model_limit, window)
    if limit is not None and limit > model_limit:
        raise SlmkitError(f"max_model_len {limit} exceeds what the model supports ({model_limit} tokens)")
    return limit if limit is not None else min(model_limit, 8192)


class Engine:
    """Generation over a paged KV cache with continuous batching (see the module docstring).

    Args:
        model: a model from ``load_model`` (dense, W8A8, pruned, per-layer widths...). Its tokenizer, if
            any, turns string prompts into tokens and tokens into text.
        config: an :class:`EngineConfig`; keyword arguments override its fields.

    Example:
        >>> engine = slmkit.Engine(slmkit.load_model("smollm2-135m"), max_batch_size=8)
        >>> engine.generate("The capital of France is", SamplingParams(max_tokens=8))[0].text
    """

    def __init__(self, model: nn.Module, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig()
        if overrides:
            fields = {f.name for f in dataclasses.fields(EngineConfig)}
            unknown = sorted(set(overrides) - fields)
            if unknown:
                raise ConfigError(f"engine: unknown option {unknown[0]!r}; allowed: {', '.join(sorted(fields))}")
            config = dataclasses.replace(config, **overrides)
        require_model(model, "Engine")
        self.config, self.model = config, model.eval()
        get_spec(model)  # an architecture slmkit does not know fails here, in one line
        self.tokenizer = get_record(model).tokenizer
        embed = model.get_input_embeddings().weight
        self.device, self.dtype = embed.device, embed.dtype
        self.max_model_len = _max_model_len(model.config, config.max_model_len)
        shapes = [attention_shape(model.config, i) for i in range(len(blocks(model)))]
        kv_heads, head_dim = [s.num_kv_heads for s in shapes], shapes[0].head_dim
        self.max_blocks_per_seq = -(-self.max_model_len // config.block_size)
        per_block = bytes_per_block(kv_heads, head_dim, config.block_size, self.dtype)
        if config.num_blocks is not None:
            num_blocks = config.num_blocks
        else:  # a fraction of free memory, no more than the largest batch could ever hold
            fraction = config.memory_fraction or (0.5 if self.device.type == "cuda" else 0.1)
            num_blocks = int(_free_memory(self.device) * fraction) // per_block
            num_blocks = min(num_blocks, config.max_batch_size * self.max_blocks_per_seq + 1)
            if num_blocks < 2:
                raise SlmkitError(f"{fraction:.0%} of free memory holds no KV-cache block "
                                  f"({per_block} bytes each); raise memory_fraction or free memory")
        self.num_blocks = num_blocks
        self.cache_bytes = num_blocks * per_block
        self.caches = allocate_layer_caches(kv_heads, head_dim, num_blocks, config.block_size, self.dtype, self.device)
        self.allocator = BlockAllocator(num_blocks, config.prefix_caching)
        self.scheduler = Scheduler(self.allocator, config.block_size, config.max_batch_size,
                                   config.max_num_batched_tokens)
        on_cuda = self.device.type == "cuda"
        use_kernels = config.use_kernels if config.use_kernels is not None else (on_cuda and HAVE_TRITON)
        if use_kernels and not HAVE_TRITON:
            raise SlmkitError("use_kernels=True needs triton installed")
        self.use_kernels = use_kernels
        self.runner = ModelRunner(model, self.caches, config.block_size, self.max_blocks_per_seq, use_kernels)
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self._sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(config.seed)
        self.graph_batch_sizes: list[int] = []
        self.speculative_proposed = self.speculative_accepted = 0  # draft tokens, over the engine's life
        self.long_rope_restarts = 0  # sequences computed again on growing past the LongRoPE switch length
        if config.cuda_graphs and on_cuda and use_kernels:
            if config.graph_batch_sizes:
                sizes = sorted({s for s in config.graph_batch_sizes if 1 <= s <= config.max_batch_size})
            else:
                sizes = sorted({s for s in DEFAULT_GRAPH_BATCH_SIZES if s < config.max_batch_size}
                               | {config.max_batch_size})
            if sizes:
                with torch.inference_mode():
                    self.runner.capture(sizes)
            self.graph_batch_sizes = sizes

    # ---- requests -------------------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt (a string through the tokenizer, optionally its chat template, or ids)."""
        if not isinstance(prompt, str):
            try:  # ints, numpy or 0-d torch integers; 1.5 or "7" is refused, not truncated
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise SlmkitError(f"a prompt is a string or a list of integer token ids, got {prompt!r:.80}") from None
        else:
            if self.tokenizer is None:
                raise SlmkitError("this model has no tokenizer: pass prompts as lists of token ids")
            if chat and getattr(self.tokenizer, "chat_template", None):
                return self.encode_messages([{"role": "user", "content": prompt}])
            ids = self.tokenizer(prompt)["input_ids"]
        vocab = self.model.config.vocab_size
        if not ids:
            raise SlmkitError("the prompt is empty: give at least one token")
        if min(ids) < 0 or max(ids) >= vocab:
            raise SlmkitError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        return ids

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation (``[{"role": "user", "content": "..."}, ...]``) through the tokenizer's
        chat template, ending where the assistant's reply starts."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise SlmkitError("this model's tokenizer has no chat template: send a plain prompt instead")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - templates raise their own errors (e.g. role order)
            raise SlmkitError(f"the chat template refused the messages: {error}") from None
        return self.encode(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, chat: bool = False) -> str:
        """Queue a request; returns its id. Fails clearly when it cannot fit the model or the cache."""
        params = params or SamplingParams()
        ids = self.encode(prompt, chat)
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise SlmkitError(f"the request needs {len(ids)} prompt + {params.max_tokens} new tokens = {total}, "
                              f"more than max_model_len {self.max_model_len}")
        blocks_needed = -(-total // self.config.block_size)
        if blocks_needed > self.allocator.usable:
            raise SlmkitError(f"the request needs {blocks_needed} KV-cache blocks but the cache holds "
                              f"{self.allocator.usable} ({self.allocator.usable * self.config.block_size} tokens); "
                              "raise num_blocks or memory_fraction, or shorten the request")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._sequences:
            raise SlmkitError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (), generator=self._seeds))
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        sequence = Sequence(request_id, ids, params, generator)
        if self._past_rope_switch(sequence):  # its cached blocks rotate otherwise than a short prompt's: no sharing
            sequence.cache_root = LONG_ROPE_ROOT
        self._sequences[request_id] = sequence
        self.scheduler.add(sequence)
        return request_id

    def abort(self, request_id: str) -> None:
        """Drop a queued or running request and free its cache blocks."""
        sequence = self._sequences.pop(request_id, None)
        if sequence is not None:
            self.scheduler.finish(sequence)

    def has_unfinished(self) -> bool:
        """Whether any request is queued or running."""
        return self.scheduler.has_work()

    # ---- one step -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StreamDelta]:
        """Run one scheduling step; returns what each request that produced tokens added."""
        self._switch_to_long_rope()
        schedule = self.scheduler.schedule()
        verify = self._speculate(schedule.decode)  # (sequence, drafts): verified beside the prompt chunks
        if verify:
            drafting = {id(s) for s, _ in verify}
            schedule.decode = [s for s in schedule.decode if id(s) not in drafting]
        ready: list[Sequence] = []  # sequences whose next token this step samples
        logits = []
        if schedule.decode:
            logits.append(self.runner.decode(self._decode_batch(schedule.decode)))
            for sequence in schedule.decode:
                sequence.num_computed += 1
            ready += schedule.decode
        verify_logits = []
        if schedule.prefill or verify:
            items = self._prompt_items(schedule.prefill) + [(s, [s.tokens[-1], *drafts], True) for s, drafts in verify]
            chunk_logits = self.runner.forward(self._chunk_batch(items))
            complete = []
            for row, (sequence, chunk) in enumerate(schedule.prefill):
                sequence.num_computed += chunk
                if sequence.pending == 0:
                    complete.append(row)
                    ready.append(sequence)
            if complete:
                logits.append(chunk_logits[torch.tensor(complete, device=chunk_logits.device)])
            row = len(schedule.prefill)
            for _, drafts in verify:  # every position's logits: the last token's and each draft's
                verify_logits.append(chunk_logits[row:row + len(drafts) + 1])
                row += len(drafts) + 1
        for sequence in [*schedule.decode, *(s for s, _ in schedule.prefill)]:
            self.scheduler.register_full_blocks(sequence)
        now = time.perf_counter()
        deltas = []
        if ready:
            tokens = self._sample(torch.cat(logits), ready).tolist()
            for sequence, token in zip(ready, tokens):
                deltas.append(self._append(sequence, token, now))
        for (sequence, drafts), rows in zip(verify, verify_logits):
            deltas.append(self._accept(sequence, drafts, rows, now))
        return deltas

    def _speculate(self, decoding: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """Prompt-lookup drafts for the decoding sequences that take them (greedy, no repetition penalty),
        within their token budget and the cache blocks they hold or can get now."""
        k = self.config.speculative_tokens
        if not k:
            return []
        verify = []
        for sequence in decoding:
            params = sequence.params
            if not params.greedy or params.repetition_penalty != 1.0:
                continue
            room = min(k, params.max_tokens - len(sequence.output_ids) - 1)  # the verified token comes on top
            if self.runner.rope_switch is not None and sequence.cache_root != LONG_ROPE_ROOT:
                room = min(room, self.runner.rope_switch - sequence.num_tokens)  # LongRoPE: verify below the switch
            if room <= 0:
                continue
            index = sequence.ngram_index
            if index is None:
                index = sequence.ngram_index = NgramIndex(self.config.speculative_ngram)
                index.extend(sequence.prompt_ids)
            index.extend(sequence.output_ids[len(index.tokens) - len(sequence.prompt_ids):])  # the new ones
            drafts = index.propose(room)
            if drafts and not self.scheduler.reserve(sequence, sequence.num_tokens + len(drafts)):
                drafts = drafts[:len(sequence.blocks) * self.config.block_size - sequence.num_tokens]
            if drafts:
                verify.append((sequence, drafts))
                self.speculative_proposed += len(drafts)
        return verify

    def _accept(self, sequence: Sequence, drafts: list[int], logits: torch.Tensor, now: float) -> StreamDelta:
        """Keep the drafts greedy decoding agrees with, plus the model's next token; one delta for them all."""
        targets = self._sample(logits, [sequence] * len(logits)).tolist()
        tokens = accept_greedy(drafts, targets)
        self.speculative_accepted += len(tokens) - 1
        sequence.num_computed += len(tokens)  # the last token's and the accepted drafts' keys are valid
        merged = StreamDelta(sequence.request_id, [], "", False)
        for token in tokens:
            delta = self._append(sequence, token, now)
            merged.token_ids += delta.token_ids
            merged.text += delta.text
            merged.finished, merged.finish_reason = delta.finished, delta.finish_reason
            if delta.finished:  # a stop inside the accepted run: what follows is dropped
                break
        if not sequence.finished:
            self.scheduler.register_full_blocks(sequence)
        return merged

    # LongRoPE (Phi-3.5, Phi-4-mini): a sequence longer than the switch length rotates every token, its
    # cached keys included, with the long factors; a shorter one with the short factors. transformers'
    # ``generate`` does the same for one sequence: when it grows past the switch, Phi-3 drops its cache and
    # computes the whole sequence again. Here such a sequence is restarted (its blocks freed, all its tokens
    # computed again), and its cached blocks chain from their own prefix-cache root.

    def _past_rope_switch(self, sequence: Sequence) -> bool:
        """LongRoPE: whether the sequence is longer than the switch length (its tokens use the long factors)."""
        return self.runner.rope_switch is not None and sequence.num_tokens > self.runner.rope_switch

    def _switch_to_long_rope(self) -> None:
        """Restart the sequences that grew past the LongRoPE switch length since the last step."""
        if self.runner.rope_switch is None:
            return
        for sequence in [*self.scheduler.running, *self.scheduler.waiting]:
            if sequence.cache_root != LONG_ROPE_ROOT and self._past_rope_switch(sequence):
                sequence.cache_root = LONG_ROPE_ROOT
                self.scheduler.restart(sequence)
                self.long_rope_restarts += 1

    def _long_rope(self, owners: list[Sequence]) -> torch.Tensor | None:
        """LongRoPE: per token (``owners``: the sequence of each), whether it rotates with the long factors."""
        if self.runner.rope_switch is None:
            return None
        return torch.tensor([s.cache_root == LONG_ROPE_ROOT for s in owners], device=self.device)

    def _slots(self, sequence: Sequence, positions) -> list[int]:
        """Flat cache slots (block · block_size + offset) of a sequence's token positions."""
        bs = self.config.block_size
        return [sequence.blocks[p // bs] * bs + p % bs for p in positions]

    def _decode_batch(self, sequences: list[Sequence]) -> Batch:
        positions = [s.num_tokens - 1 for s in sequences]
        width = max(len(s.blocks) for s in sequences)
        table = [s.blocks + [0] * (width - len(s.blocks)) for s in sequences]
        device = self.device
        return Batch(
            input_ids=torch.tensor([s.output_ids[-1] if s.output_ids else s.prompt_ids[-1] for s in sequences],
                                   device=device),
            positions=torch.tensor(positions, device=device),
            slots=torch.tensor([self._slots(s, [p])[0] for s, p in zip(sequences, positions)], device=device),
            decode=True,
            block_table=torch.tensor(table, dtype=torch.int32, device=device),
            seq_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=device),
            long_rope=self._long_rope(sequences),
        )

    @staticmethod
    def _prompt_items(chunks: list[tuple[Sequence, int]]) -> list[tuple[Sequence, list[int], bool]]:
        """:meth:`_chunk_batch` items of prompt chunks (sequence, chunk length): logits of the last row."""
        return [(s, s.tokens[s.num_computed:s.num_computed + chunk], False) for s, chunk in chunks]

    def _chunk_batch(self, items: list[tuple[Sequence, list[int], bool]]) -> Batch:
        """Token runs (sequence, tokens, all_rows) that follow each sequence's computed tokens: prompt chunks
        (logits of the last row) and speculative verifications (logits of every row, ``all_rows``)."""
        ids, positions, slots, gather, cu_q, cu_k, rows, owners = [], [], [], [], [0], [0], [], []
        any_prefix = any(s.num_computed for s, _, _ in items)
        for sequence, tokens, all_rows in items:
            start, end = sequence.num_computed, sequence.num_computed + len(tokens)
            ids += tokens
            span = range(start, end)
            positions += span
            owners += [sequence] * len(span)
            slots += self._slots(sequence, span)
            if any_prefix:
                gather += self._slots(sequence, range(end))
            rows += range(cu_q[-1], cu_q[-1] + len(tokens)) if all_rows else [cu_q[-1] + len(tokens) - 1]
            cu_q.append(cu_q[-1] + len(tokens))
            cu_k.append(cu_k[-1] + end)
        device = self.device
        return Batch(
            input_ids=torch.tensor(ids, device=device),
            positions=torch.tensor(positions, device=device),
            slots=torch.tensor(slots, device=device),
            decode=False,
            cu_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
            cu_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
            max_q=max(len(tokens) for _, tokens, _ in items),
            gather=torch.tensor(gather, device=device) if any_prefix else None,
            logits_rows=torch.tensor(rows, device=device),
            long_rope=self._long_rope(owners),
        )

    def _sample(self, logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in sequences]
        seen = None
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            for row, sequence in enumerate(sequences):
                seen[row, torch.tensor(sequence.tokens, device=logits.device)] = True
        return sample_tokens(logits, params, [s.generator for s in sequences], seen)

    def _append(self, sequence: Sequence, token: int, now: float) -> StreamDelta:
        params = sequence.params
        sequence.output_ids.append(token)
        sequence.token_times.append(now)
        if sequence.first_token_time is None:
            sequence.first_token_time = now
        if (token in params.stop_token_ids) or (token in self.eos_ids and not params.ignore_eos):
            sequence.finish_reason = "stop"
        elif len(sequence.output_ids) >= params.max_tokens:
            sequence.finish_reason = "length"
        text = sequence.text
        if self.tokenizer is not None:
            text = self.tokenizer.decode(sequence.output_ids, skip_special_tokens=True)
            if params.stop:
                cut = _find_stop(text, params.stop, max(0, len(sequence.text) - max(map(len, params.stop))))
                if cut is not None:
                    text, sequence.finish_reason = text[:cut], "stop"
            if not sequence.finished and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more
                text = sequence.text
            sequence.text = text
        if sequence.finished:
            self.scheduler.finish(sequence)
            self._sequences.pop(sequence.request_id, None)
        # stream everything except a tail that might still grow into a stop string
        hold = 0 if sequence.finished or not params.stop else max(map(len, params.stop)) - 1
        visible = max(sequence.emitted, len(text) - hold)
        delta_text = text[sequence.emitted:visible]
        sequence.emitted = visible
        new_tokens = sequence.output_ids[sequence.emitted_tokens:]
        sequence.emitted_tokens = len(sequence.output_ids)
        return StreamDelta(sequence.request_id, new_tokens, delta_text, sequence.finished, sequence.finish_reason)

    # ---- batch and streaming APIs ---------------------------------------------------------------------------

    def generate(self, prompts: str | list[int] | list, params: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = False, progress: bool = True) -> list[Completion]:
        """Run prompts to completion, batched; returns one :class:`Completion` per prompt, in order.

        ``prompts``: a string, a list of token ids, or a list of either. ``params``: one for all or one each.
        """
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise SlmkitError(f"{len(params)} sampling params for {len(prompts)} prompts")
            all_params = params
        else:
            all_params = [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp, chat=chat) for p, sp in zip(prompts, all_params)]
        sequences = {i: self._sequences[i] for i in ids}
        from tqdm.auto import tqdm

        with tqdm(total=len(ids), desc="generate", unit="req", disable=not progress) as bar:
            while any(not sequences[i].finished for i in ids):
                for delta in self.step():
                    if delta.finished and delta.request_id in sequences:
                        bar.update(1)
        return [_completion(sequences[i]) for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[StreamDelta]:
        """Yield a request's :class:`StreamDelta` as tokens arrive (other queued requests progress too)."""
        request_id = self.add_request(prompt, params, chat=chat)
        try:
            while True:
                for delta in self.step():
                    if delta.request_id == request_id:
                        yield delta
                        if delta.finished:
                            return
        finally:
            self.abort(request_id)  # a consumer that stops early frees the request's blocks

    def stats(self) -> dict:
        """Cache and scheduler figures: blocks, bytes, prefix-cache hits, preemptions, CUDA graphs."""
        return {"num_blocks": self.num_blocks, "block_size": self.config.block_size, "cache_bytes": self.cache_bytes,
                "free_blocks": self.allocator.available, "prefix_cache_hit_blocks": self.allocator.hits,
                "prefix_cache_query_blocks": self.allocator.queries, "preemptions": self.scheduler.preemptions,
                "cuda_graph_batch_sizes": self.graph_batch_sizes, "use_kernels": self.use_kernels,
                "max_model_len": self.max_model_len, "speculative_proposed_tokens": self.speculative_proposed,
                "speculative_accepted_tokens": self.speculative_accepted, "long_rope_restarts": self.long_rope_restarts}


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _completion(sequence: Sequence) -> Completion:
    return Completion(sequence.request_id, sequence.prompt_ids, sequence.output_ids, sequence.text,
                      sequence.finish_reason, sequence.cached_tokens,
                      (sequence.first_token_time or sequence.arrival_time) - sequence.arrival_time, sequence.token_times)


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids |= set(value) if isinstance(value, (list, tuple)) else {value}
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
