"""The serving engine: requests in, tokens out, one model step at a time.

One :meth:`LLMEngine.step` = schedule → restore snapshots and copy-on-write blocks → build the step's metadata → one
forward over every scheduled token (decodes and prefill chunks of many sequences together) → logits for the rows
that end their known tokens → sample → append, check stops, stream, register snapshots, release what finished.

``add_request`` and ``abort`` may be called from any thread (a server's): they validate at once (a bad request
raises :class:`RequestError` to its caller and nothing else notices) and hand the work to the thread that calls
``step`` through a queue. :class:`~kimi_linear.engine.async_engine.AsyncEngine` runs that loop in the background.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from kimi_linear.cache import CachePool, cache_spec
from kimi_linear.engine.allocator import BlockAllocator, SlotAllocator
from kimi_linear.engine.request import Completion, Detokenizer, Request, RequestOutput, Status, TokenLogprob
from kimi_linear.engine.scheduler import Prefill, Scheduler, SchedulerConfig, StepPlan
from kimi_linear.sampling import RowState, SamplingParams, sample
from kimi_linear.step import Snapshot, StepMetadata

Listener = Callable[[RequestOutput], None]
log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve (bad prompt or parameters); the message says what and why."""


@dataclass
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_model_len: int | None = None  # default: the model's, capped by what the pools hold
    memory_budget: int | None = None  # bytes for both pools; default: 90% of free GPU memory, or 1 GiB on CPU
    num_slots: int | None = None  # explicit pool sizes (tests), instead of the budget
    num_blocks: int | None = None
    block_size: int = 64
    seed: int = 0  # randomness of requests without a seed
    poison_freed: bool = False  # fill freed slots and blocks with NaN (tests: nothing may read freed memory)


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    computed_tokens: int = 0  # tokens the model processed (prefill + decode)


class LLMEngine:
    def __init__(self, model: torch.nn.Module, config: EngineConfig | None = None, *,
                 decode: Callable[[list[int]], str] | None = None,
                 eos_token_ids: Iterable[int] | None = None) -> None:
        """``model``: a :class:`~kimi_linear.model.KimiLinearForCausalLM` (its weights' device and dtype are the
        pools'); ``decode``: token ids → text, needed for text output and stop strings; ``eos_token_ids``: stop tokens
        besides each request's own (default: the model config's)."""
        self.model = model.eval()
        self.config = config or EngineConfig()
        mc = model.config
        weight = model.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        num_slots, num_blocks = self._pool_sizes()
        self.pool = CachePool(mc, num_slots, num_blocks, block_size=self.config.block_size, device=self.device,
                              dtype=self.dtype)
        poison = self.config.poison_freed
        self.slots = SlotAllocator(num_slots, self._poison_slots if poison else None)
        self.blocks = BlockAllocator(num_blocks, self._poison_blocks if poison else None)
        self.scheduler = Scheduler(self.config.scheduler, self.slots, self.blocks, self.config.block_size)
        capacity = (num_blocks - 1) * self.config.block_size
        self.max_model_len = min(self.config.max_model_len or mc.model_max_length, capacity)
        self.vocab_size = mc.vocab_size
        self.decode = decode
        self.eos_token_ids = frozenset(mc.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.stats = EngineStats()
        self._requests: dict[str, Request] = {}
        self._listeners: dict[str, Listener] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()

    # ---- sizing ------------------------------------------------------------------------------------------------------
    def _pool_sizes(self) -> tuple[int, int]:
        c = self.config
        if c.num_slots is not None and c.num_blocks is not None:
            return c.num_slots, c.num_blocks
        spec = cache_spec(self.model.config, self.dtype, c.block_size)
        budget = c.memory_budget
        if budget is None:
            budget = int(0.9 * torch.cuda.mem_get_info(self.device)[0]) if self.device.type == "cuda" else 1 << 30
        running = c.scheduler.max_num_seqs + 1  # and the padding slot
        # A quarter of what the running sequences leave goes to snapshot slots (at most 4 per running sequence),
        # the rest to latent blocks.
        extra = min(4 * running, max(budget - running * spec.bytes_per_slot, 0) // 4 // max(spec.bytes_per_slot, 1))
        num_slots = c.num_slots or running + extra
        left = budget - num_slots * spec.bytes_per_slot
        num_blocks = c.num_blocks or (left // spec.bytes_per_block if spec.bytes_per_block else 2)
        if num_blocks < 2:
            raise ValueError(f"a memory budget of {budget:,} bytes does not hold {num_slots} state slots of "
                             f"{spec.bytes_per_slot:,} bytes and any latent block ({spec.bytes_per_block:,} bytes)")
        return num_slots, num_blocks

    def _poison_slots(self, slots: list[int]) -> None:
        self.pool.fill_slots(torch.tensor(slots, device=self.device), float("nan"))

    def _poison_blocks(self, blocks: list[int]) -> None:
        self.pool.fill_blocks(torch.tensor(blocks, device=self.device), float("nan"))

    # ---- requests ----------------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, listener: Listener | None = None) -> str:
        """Queue a request; returns its id. Raises :class:`RequestError` when it cannot be served."""
        params = params or SamplingParams()
        prompt = self._check_request(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        request = Request(request_id, prompt, params, time.monotonic())
        self._inbox.put(("add", request, listener))
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request (unknown or finished ids are ignored); its memory is freed at the next step."""
        self._inbox.put(("abort", request_id, None))

    def has_unfinished(self) -> bool:
        return bool(self._requests) or not self._inbox.empty()

    @property
    def request_ids(self) -> list[str]:
        return list(self._requests)

    def fail_all(self, message: str) -> None:
        """End every request in flight with ``message`` (after a step raised). Their states may be half updated, so
        none is kept in the prefix cache."""
        outputs = []
        for request in list(self._requests.values()):
            request.error = message
            for seq in request.sequences:
                seq.abort()
                self.scheduler.finish(seq, keep_state=False)
            outputs.append(self._output(request))
        self._publish(outputs)

    def _check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError) as e:
            raise RequestError(f"prompt must be a list of token ids: {e}") from None
        if not prompt:
            raise RequestError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token ids must be in [0, {self.vocab_size}); the prompt has {bad[:5]}")
        try:
            params.validate(self.vocab_size)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if len(prompt) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt)} tokens; the model length is {self.max_model_len}, "
                               f"which leaves no room for output")
        if params.max_tokens is not None and len(prompt) + params.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model "
                               f"length {self.max_model_len}")
        if params.stop and self.decode is None:
            raise RequestError("stop strings need a tokenizer: this engine has none")
        if params.n > self.config.scheduler.max_num_seqs:
            raise RequestError(f"n = {params.n} exceeds max_num_seqs = {self.config.scheduler.max_num_seqs}")
        return prompt

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs = []
        while not self._inbox.empty():
            kind, item, listener = self._inbox.get()
            if kind == "add":
                self._requests[item.request_id] = item
                if listener is not None:
                    self._listeners[item.request_id] = listener
                self.stats.prompt_tokens += item.num_prompt
                self.scheduler.add(self._new_sequence(item, 0))
            elif (request := self._requests.get(item)) is not None:
                request.aborted = True
                for seq in request.sequences:
                    seq.abort()
                    self.scheduler.finish(seq)
                outputs.append(self._output(request))
        return outputs

    def _new_sequence(self, request: Request, index: int) -> Completion:
        seed = request.params.seed
        generator = None
        if seed is not None:  # completion i of a seeded request has its own stream, the same in every run
            generator = torch.Generator(device=self.device).manual_seed(seed if index == 0 else hash((seed, index)))
        seq = Completion(next(self._ids), request, index, list(request.prompt_ids), generator,
                       detokenizer=Detokenizer(self.decode) if self.decode else None)
        request.sequences.append(seq)
        return seq

    # ---- the step ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one model step; returns the outputs of the requests that advanced (or ended)."""
        outputs = self._drain_inbox()
        plan = self.scheduler.schedule()
        if plan.empty:
            return self._publish(outputs)
        self.stats.steps += 1
        self._copy(plan)
        try:
            rows, hidden = self._forward(plan)
        except BaseException:
            for run in plan.prefills:  # slots of snapshots the failed step never registered
                for _, slot in run.snapshots:
                    self.slots.free(slot)
            raise
        logits = self.model.compute_logits(hidden) if rows else None
        advanced = self._sample(rows, logits)
        for request in advanced:
            outputs.append(self._output(request))
        return self._publish(outputs)

    def _copy(self, plan: StepPlan) -> None:
        def index(pairs: list[tuple[int, int]], i: int) -> torch.Tensor:
            return torch.tensor([p[i] for p in pairs], device=self.device)

        if plan.slot_copies:
            self.pool.copy_slots(index(plan.slot_copies, 0), index(plan.slot_copies, 1))
        if plan.block_copies:
            self.pool.copy_blocks(index(plan.block_copies, 0), index(plan.block_copies, 1))

    def _forward(self, plan: StepPlan) -> tuple[list[Completion], torch.Tensor | None]:
        """One forward over the plan's decodes and prefill pieces; advances ``computed`` and registers snapshots.
        Returns the sequences to sample and their final hidden states ``[R, D]``, in that order."""
        runs: list[Prefill] = [Prefill(s, 1) for s in plan.decodes] + plan.prefills
        rows = list(plan.ready)
        hidden_parts = [s.ready_hidden[None] for s in plan.ready]
        if runs:
            ids, snapshots = [], []
            for i, run in enumerate(runs):
                ids.extend(run.seq.tokens[run.seq.computed:run.seq.computed + run.num_tokens])
                snapshots.extend(Snapshot(i, length, slot) for length, slot in run.snapshots)
            meta = StepMetadata.build(
                [r.num_tokens for r in runs], [r.seq.computed for r in runs], device=self.device,
                num_decodes=len(plan.decodes), state_slots=[r.seq.slot for r in runs],
                block_tables=[r.seq.blocks for r in runs], block_size=self.config.block_size, snapshots=snapshots)
            hidden = self.model.forward_step(torch.tensor(ids, device=self.device), meta, self.pool)
            self.stats.computed_tokens += len(ids)
            ends = meta.cu_seqlens_host[1:]
            for i, run in enumerate(runs):
                seq, start = run.seq, run.seq.computed
                seq.computed += run.num_tokens
                end_hidden = hidden[ends[i] - 1].clone() if seq.computed == len(seq.tokens) else None
                for length, slot in run.snapshots:
                    self._keep_snapshot(seq, start + length, slot, end_hidden if length == run.num_tokens else None)
                if seq.computed == len(seq.tokens):
                    rows.append(seq)
                    hidden_parts.append(hidden[ends[i] - 1:ends[i]])
        for seq in plan.ready:
            seq.ready_hidden = None
        return rows, torch.cat(hidden_parts) if hidden_parts else None

    def _keep_snapshot(self, seq: Completion, depth: int, slot: int, hidden: torch.Tensor | None) -> None:
        cache = self.scheduler.prefix_cache
        if cache.insert(seq.tokens[:depth], slot, seq.blocks, hidden) is None:
            self.slots.free(slot)

    def _sample(self, rows: list[Completion], logits: torch.Tensor | None) -> list[Request]:
        if not rows:
            return []
        states = [RowState(s.params, s.request.prompt_ids, s.output_ids, self._stop_ids(s), s.generator)
                  for s in rows]
        picked = sample(logits, states, self.generator)
        advanced: dict[str, Request] = {}
        for i, seq in enumerate(rows):
            lp = None
            if seq.params.logprobs is not None:
                lp = TokenLogprob(picked.tokens[i], picked.logprob[i], picked.top[i])
            first = len(seq.tokens) == seq.num_prompt
            seq.append(picked.tokens[i], lp, self._stop_ids(seq), self.max_model_len)
            self.stats.generated_tokens += 1
            request = seq.request
            advanced[request.request_id] = request
            if first and seq.index == 0:  # the prompt is in the prefix cache now: the other completions start
                for index in range(request.params.n - 1, 0, -1):
                    self.scheduler.add(self._new_sequence(request, index), front=True)
            if seq.finished:
                self.scheduler.finish(seq)
        return list(advanced.values())

    def _stop_ids(self, seq: Completion) -> frozenset[int]:
        own = frozenset(seq.params.stop_token_ids)
        return own if seq.params.ignore_eos else own | self.eos_token_ids

    def _output(self, request: Request) -> RequestOutput:
        seqs = sorted(request.sequences, key=lambda s: s.index)
        outs = [o for s in seqs if (o := s.take_output()) is not None]
        return RequestOutput(request.request_id, outs, request.finished, request.num_prompt,
                             max(seqs[0].cached_tokens, 0) if seqs else 0,
                             sum(len(s.output_ids) for s in seqs), request.error)

    def _publish(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        for out in outputs:
            listener = self._listeners.get(out.request_id)
            if listener is not None:
                try:
                    listener(out)
                except Exception:  # a consumer that went away (its event loop closed): stop telling it, and
                    log.warning("dropping the listener of %s, which raised", out.request_id, exc_info=True)
                    self._listeners.pop(out.request_id, None)
                    if not out.finished:  # nobody listens: the request's memory goes back
                        self.abort(out.request_id)
            if out.finished:
                self._requests.pop(out.request_id, None)
                self._listeners.pop(out.request_id, None)
        return outputs

    # ---- conveniences ------------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> list[list[list[int]]]:
        """Run prompts to completion; returns each prompt's completions' output token ids."""
        ids = [self.add_request(p, params) for p in prompts]
        tokens: dict[str, dict[int, list[int]]] = {i: {} for i in ids}
        while self.has_unfinished():
            for out in self.step():
                for o in out.outputs:
                    tokens[out.request_id].setdefault(o.index, []).extend(o.token_ids)
        return [[tokens[i][k] for k in sorted(tokens[i])] for i in ids]

    def clear_prefix_cache(self) -> None:
        """Drop every cached prefix (their slots and blocks return to the free lists)."""
        if self.scheduler.prefix_cache is not None:
            self.scheduler.prefix_cache.clear()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)


__all__ = ["EngineConfig", "LLMEngine", "RequestError", "Status"]
