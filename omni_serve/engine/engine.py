"""The engine: the one way serving code runs the model.

A scheduler thread owns the model. It prefills each new request on its own, then decodes every
active request together, one token per step (step-level continuous batching). Each generated token
goes to the request's unit stream (speech units) and, chunk by chunk, to its vocoder stream on the
vocoder thread, and every result is sent to the request's consumer as an event.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from omni_serve.engine.batch import DecodeBatch
from omni_serve.engine.detokenizer import Detokenizer
from omni_serve.engine.events import ErrorEvent, Event, Finished, TextDelta, Timings, UnitChunk
from omni_serve.engine.options import SpeechRequest
from omni_serve.engine.prompting import PromptBuilder
from omni_serve.engine.sampling import choose_token
from omni_serve.engine.state import Conversation, RequestState
from omni_serve.engine.vocoding import VocoderThread
from omni_serve.model.audio import AudioLimits, validate_waveform
from omni_serve.model.errors import AudioError, AudioTooLongError, ContextLengthError, OmniError
from omni_serve.model.loader import OmniModel, dtype_name, load_model
from omni_serve.model.prompt import tokenize_speech_prompt
from omni_serve.model.units import push_units

log = logging.getLogger(__name__)

FINAL_EVENTS = (Finished, ErrorEvent)


class Engine:
    """Runs requests against one loaded model; thread-safe; start it once per process."""

    def __init__(self, model: OmniModel, max_batch_size: int = 8, max_conversations: int = 64,
                 audio_limits: AudioLimits = AudioLimits(), max_context: int | None = None) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_conversations = max_conversations
        self.audio_limits = audio_limits
        self.max_context = max_context or int(model.config.raw.get("tokenizer_model_max_length")
                                               or model.config.llm.max_position_embeddings)
        self.eos_ids = set(model.end_token_ids)
        self.end_of_turn_id = model.end_of_turn_id
        self._prompts = PromptBuilder(model, self.end_of_turn_id)
        self._inbox: queue.Queue[RequestState] = queue.Queue()
        self._active: list[RequestState] = []
        self._batch = DecodeBatch()
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._vocoder = VocoderThread(model.vocoder.sample_rate) if model.vocoder else None
        self._thread = threading.Thread(target=self._run, name="omni-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_path(cls, model_path: str | Path, vocoder: str | Path | None = None,
                  speech_encoder: str | Path | None = None, device: str = "auto", dtype: str | None = None,
                  **engine_options) -> Engine:
        return cls(load_model(model_path, vocoder, speech_encoder, device, dtype), **engine_options)

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def placement(self) -> str:
        """Device and weight type, e.g. 'cuda bfloat16': what an operator checks first on a GPU host."""
        dtype = self.model.network.lm_head.weight.dtype
        return f"{self.model.device} {dtype_name(dtype)}"

    @property
    def sample_rate(self) -> int | None:
        return self.model.vocoder.sample_rate if self.model.vocoder else None

    @property
    def queue_length(self) -> int:
        """Requests waiting or being decoded (what a controller balances on)."""
        return self._inbox.qsize() + len(self._active)

    def submit(self, request: SpeechRequest, emit: Callable[[Event], None]) -> RequestState:
        """Queue a request; events go to `emit` from the engine thread. Set `state.cancelled` to stop it."""
        if self._closed.is_set():
            raise RuntimeError("engine is closed")
        generator = None
        if request.options.seed is not None:
            generator = torch.Generator().manual_seed(request.options.seed)
        vocoder = self.model.vocoder.stream() if self.model.vocoder and request.options.vocode else None
        state = RequestState(request=request, emit=emit, detokenizer=Detokenizer(self.model.tokenizer),
                             units=self.model.new_unit_stream(), vocoder=vocoder, generator=generator,
                             conversation=None)
        self._inbox.put(state)
        return state

    def generate(self, request: SpeechRequest) -> Iterator[Event]:
        """Blocking stream of events; closing the iterator early cancels the request."""
        events: queue.Queue[Event] = queue.Queue()
        state = self.submit(request, events.put)
        try:
            while True:
                event = events.get()
                yield event
                if isinstance(event, FINAL_EVENTS):
                    return
        finally:
            state.cancelled.set()

    async def agenerate(self, request: SpeechRequest) -> AsyncIterator[Event]:
        """Async stream of events; when the consumer stops (disconnect, cancel) generation stops too."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the consumer's loop is gone
                state.cancelled.set()

        state = self.submit(request, emit)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, FINAL_EVENTS):
                    return
        finally:
            state.cancelled.set()

    def end_conversation(self, conversation_id: str) -> bool:
        with self._lock:
            return self._conversations.pop(conversation_id, None) is not None

    def close(self) -> None:
        self._closed.set()
        self._inbox.put(None)  # wake the thread
        self._thread.join(timeout=10)
        if self._vocoder is not None:
            self._vocoder.close()

    # --- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._closed.is_set():
            self._admit()
            if self._active:
                try:
                    self._decode_step()
                except Exception as exc:  # a failed step fails its requests, never the engine
                    log.exception("decode step failed")
                    for state in self._active:
                        self._fail(state, ErrorEvent(f"generation failed: {exc}", "internal"))
                    self._active, self._batch = [], DecodeBatch()

    def _admit(self) -> None:
        while len(self._active) < self.max_batch_size:
            try:
                state = self._inbox.get(block=not self._active, timeout=None if not self._active else 0)
            except queue.Empty:
                return
            if state is None or state.cancelled.is_set():
                continue
            try:
                self._start(state)
            except OmniError as exc:
                self._fail(state, ErrorEvent(str(exc), _error_code(exc)))
            except Exception as exc:
                log.exception("request failed at prefill")
                self._fail(state, ErrorEvent(f"generation failed: {exc}", "internal"))

    def _start(self, state: RequestState) -> None:
        request, model = state.request, self.model
        began = time.perf_counter()
        speech = [self._encode(request.audio)] if request.audio is not None else []
        history_speech = [self._encode(turn.audio) for turn in request.history if turn.audio is not None]
        state.encode_s = time.perf_counter() - began
        conversation = self._conversation(request)
        state.conversation = conversation
        reuse = conversation is not None and conversation.cache is not None
        content = self._prompts.user_content(request.audio is not None, request.text)
        if request.prompt is not None:
            new_ids = tokenize_speech_prompt(model.tokenizer, request.prompt, first=True)
        elif conversation is not None and conversation.ids:
            new_ids = conversation.unfed + self._prompts.turn_ids(content, first=False)
        else:
            new_ids = []
            for index, turn in enumerate(request.history):
                turn_content = self._prompts.user_content(turn.audio is not None, turn.text)
                new_ids += self._prompts.turn_ids(turn_content, first=index == 0)
                new_ids += self._prompts.answer_ids(turn.answer)
            new_ids += self._prompts.turn_ids(content, first=not request.history)
            speech = history_speech + speech
        if conversation is not None and conversation.ids and not reuse:  # recompute the whole history
            prefix_ids, prefix_speech = conversation.ids, conversation.speech
        else:
            prefix_ids, prefix_speech = [], []
        state.prompt_ids, state.prompt_speech = new_ids, speech
        with torch.inference_mode():
            embeds = model.network.embed_prompt(prefix_ids + new_ids, prefix_speech + speech)
            cache = conversation.cache if reuse else model.network.new_cache()
            start = cache.get_seq_length()
            total = start + embeds.shape[1] + request.options.max_new_tokens
            if total > self.max_context:
                raise ContextLengthError(
                    f"the conversation needs {total} positions but the model holds {self.max_context}; "
                    "start a new conversation or ask for fewer new tokens (max_new_tokens; max_tokens in the OpenAI API)")
            if conversation is not None:
                conversation.cache = None  # in use; restored only if this turn completes
            positions = torch.arange(start, start + embeds.shape[1], device=embeds.device).unsqueeze(0)
            state.prompt_positions = start + embeds.shape[1]
            step = model.network.step(embeds, cache, position_ids=positions)
        state.prefill_s = time.perf_counter() - began - state.encode_s
        token = choose_token(step.logits[0], request.options, state.token_ids, state.generator)
        if self._handle_token(state, token, step.hidden[0]):
            self._finish(state, lambda: cache)
        else:
            self._batch.add(cache, cache.get_seq_length())
            self._active.append(state)

    def _encode(self, audio: np.ndarray) -> torch.Tensor:
        validate_waveform(audio, self.audio_limits)
        with torch.inference_mode():
            return self.model.front_end.encode(np.ascontiguousarray(audio, dtype=np.float32))

    def _decode_step(self) -> None:
        cancelled = [row for row, state in enumerate(self._active) if state.cancelled.is_set()]
        if cancelled:
            for row in cancelled:
                self._fail(self._active[row], ErrorEvent("the request was cancelled", "cancelled"))
            self._drop(cancelled)
            if not self._active:
                return
        network = self.model.network
        with torch.inference_mode():
            last = torch.tensor([s.token_ids[-1] for s in self._active], device=self.model.device)
            embeds = network.embed_tokens(last).unsqueeze(1)
            mask = self._batch.extend_mask()
            step = network.step(embeds, self._batch.cache, attention_mask=mask, position_ids=self._batch.position_ids())
        self._batch.advance()
        tokens, texts = [], []
        for row, state in enumerate(self._active):
            tokens.append(choose_token(step.logits[row], state.request.options, state.token_ids, state.generator))
            texts.append(self._accept_token(state, tokens[-1]))
        with torch.inference_mode():  # all rows' speech decoder steps as one batch
            units = push_units([state.units for state in self._active], step.hidden, tokens, texts)
        finished = [row for row, state in enumerate(self._active) if self._deliver(state, texts[row], units[row])]
        for row in finished:
            self._finish(self._active[row], lambda row=row: self._batch.row_cache(row))
        if finished:
            self._drop(finished)

    def _drop(self, rows: list[int]) -> None:
        self._batch.remove(rows)
        self._active = [s for i, s in enumerate(self._active) if i not in set(rows)]

    def _handle_token(self, state: RequestState, token: int, hidden: torch.Tensor) -> bool:
        """Record one generated token, emit what it makes final; True when the request is done."""
        text = self._accept_token(state, token)
        with torch.inference_mode():
            units = state.units.push(hidden, token, text)
        return self._deliver(state, text, units)

    def _accept_token(self, state: RequestState, token: int) -> str:
        """Record a generated token; its text delta."""
        now = time.perf_counter()
        state.first_token_at = state.first_token_at or now
        state.last_token_at = now
        state.token_ids.append(token)
        state.stopped_on_eos = token in self.eos_ids
        return state.detokenizer.push(token)

    def _deliver(self, state: RequestState, text: str, units: list[int]) -> bool:
        """Emit what the latest token made final (text, units, audio); True when the request is done."""
        options = state.request.options
        done = state.stopped_on_eos or len(state.token_ids) >= options.max_new_tokens
        if done:
            text += state.detokenizer.flush()
            units = units + state.units.finish()
        if text:
            state.emit(TextDelta(text))
        if units:
            state.emit(UnitChunk(units))
            state.all_units.extend(units)
            state.pending_units.extend(units)
        threshold = options.chunk_units if state.vocoding_started else options.first_chunk_units
        if state.vocoder is not None and (done or len(state.pending_units) >= threshold):
            self._vocoder.push(state, state.pending_units, final=done)
            state.pending_units = []
        return done

    def _finish(self, state: RequestState, cache: Callable[[], object] | None) -> None:
        """Keep the conversation (when the request has one), then send the final event after the audio."""
        if state.conversation is not None and cache is not None:
            self._remember(state, cache())

        def send() -> None:
            state.emit(Finished(text=state.detokenizer.emitted, token_ids=list(state.token_ids),
                                units=list(state.all_units), stopped_on_eos=state.stopped_on_eos,
                                timings=self._timings(state), conversation_id=state.request.conversation_id))

        self._after_audio(state, send)

    def _after_audio(self, state: RequestState, action: Callable[[], None]) -> None:
        """Run `action` after the request's queued audio (at once when it has no vocoder)."""
        if state.vocoder is not None:
            self._vocoder.then(state, action)
        else:
            action()

    def _timings(self, state: RequestState) -> Timings:
        end = time.perf_counter()
        decode_span = (state.last_token_at or end) - (state.first_token_at or end)
        tokens = len(state.token_ids)
        audio_s = state.audio_samples / self.model.vocoder.sample_rate if self.model.vocoder else 0.0
        return Timings(
            prompt_positions=state.prompt_positions, encode_s=state.encode_s, prefill_s=state.prefill_s,
            first_token_s=(state.first_token_at - state.started) if state.first_token_at else None,
            first_audio_s=(state.first_audio_at - state.started) if state.first_audio_at else None,
            total_s=end - state.started,
            tokens_per_s=(tokens - 1) / decode_span if tokens > 1 and decode_span > 0 else 0.0,
            audio_s=audio_s, vocoder_s=state.vocoder_s,
            real_time_factor=state.vocoder_s / audio_s if audio_s else None,
        )

    def _conversation(self, request: SpeechRequest) -> Conversation | None:
        if request.conversation_id is None:
            return None
        with self._lock:
            conversation = self._conversations.pop(request.conversation_id, None) or Conversation()
            self._conversations[request.conversation_id] = conversation  # most recent last
            while len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)
        return conversation

    def _remember(self, state: RequestState, cache) -> None:
        conversation = state.conversation
        conversation.ids = conversation.ids + state.prompt_ids + state.token_ids[:-1]
        conversation.speech = conversation.speech + state.prompt_speech
        conversation.unfed = state.token_ids[-1:] + ([] if state.stopped_on_eos else [self.end_of_turn_id])
        conversation.cache = cache
        conversation.last_used = time.monotonic()

    def _fail(self, state: RequestState, error: ErrorEvent) -> None:
        if state.conversation is not None:
            state.conversation.cache = None  # the turn did not complete; history is recomputed next time
        self._after_audio(state, lambda: state.emit(error))


def _error_code(exc: OmniError) -> str:
    if isinstance(exc, AudioTooLongError):
        return "too_long"
    if isinstance(exc, AudioError):
        return "bad_audio"
    if isinstance(exc, ContextLengthError):
        return "context_full"
    return "bad_request"
