"""gguf_serve.v1.Inference over the shared AsyncEngine: translation only (conversions.py does the mapping).

Exceptions are left to interceptor.py, which maps them to status codes. Every
generation is aborted when its call ends early (cancelled by the client, a
passed deadline, the connection gone), so its KV blocks are freed before the
engine's next step.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from gguf_serve.v1 import inference_pb2 as pb
from gguf_serve.v1 import inference_pb2_grpc as pb_grpc
from grpc_api import conversions as conv
from grpc_api.interceptor import RpcError
from runtime.async_engine import AsyncEngine
from runtime.pooling import Pooling, normalize
from runtime.sampling_params import SamplingParams
from runtime.slot_store import erase_slot, restore_slot, save_slot

AsyncEngineProvider = Callable[[], "AsyncEngine | None"]


class InferenceServicer(pb_grpc.InferenceServicer):
    """The Inference service. `engine_provider()` is None while the model loads (UNAVAILABLE then)."""

    def __init__(
        self,
        engine_provider: AsyncEngineProvider,
        *,
        model_alias: str | None = None,
        chat_template: str | None = None,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self._provider = engine_provider
        self._max_message_bytes = max_message_bytes
        self._alias = model_alias
        self._chat_template_override = chat_template
        self._templates: dict[int, Any] = {}  # id(engine) -> ChatTemplate, built on first use

    def _engine(self) -> AsyncEngine:
        ae = self._provider()
        if ae is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the model is loading")
        if not ae.is_running:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the engine is not running")
        return ae

    async def _generate(
        self,
        ae: AsyncEngine,
        ids: list[int],
        params: SamplingParams,
        id_slot: int | None,
        context: aio.ServicerContext,
    ) -> AsyncIterator[pb.GenerateResponse]:
        rid = f"grpc-{uuid.uuid4().hex[:24]}"
        finished = False

        def on_done(_: Any) -> None:
            # Cancellation also closes the stream below, but a done callback fires whatever
            # await the handler was parked on: the request never outlives its call.
            if not finished:
                ae.abort(rid)

        context.add_done_callback(on_done)
        kw = {} if id_slot is None else {"id_slot": id_slot}
        tok = ae.engine.tokenizer
        async for out in ae.generate(ids, params, request_id=rid, **kw):
            finished = out.finished
            yield conv.response(out, tok)

    # -- generation --------------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        ae = self._engine()
        tok = ae.engine.tokenizer
        params = conv.sampling_params(request.params, tok)
        ids = conv.generate_prompt(request, tok)
        id_slot = request.id_slot if request.HasField("id_slot") else None
        async for msg in self._generate(ae, ids, params, id_slot, context):
            yield msg

    async def Complete(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> pb.GenerateResponse:
        return conv.merge([m async for m in self.Generate(request, context)])

    async def Chat(
        self, request: pb.ChatRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        ae = self._engine()
        tok = ae.engine.tokenizer
        params = conv.sampling_params(request.params, tok)
        kwargs = (
            conv.struct_to_dict(request.chat_template_kwargs)
            if request.HasField("chat_template_kwargs")
            else {}
        )
        prompt = self._template(ae).render(
            conv.chat_messages(request),
            add_generation_prompt=request.add_generation_prompt
            if request.HasField("add_generation_prompt")
            else True,
            tools=[conv.struct_to_dict(t) for t in request.tools] or None,
            **kwargs,
        )
        # As llama.cpp: the template leaves BOS to the tokenizer; its special tokens are parsed.
        ids = tok.encode(prompt, add_special=True, parse_special=True)
        id_slot = request.id_slot if request.HasField("id_slot") else None
        async for msg in self._generate(ae, ids, params, id_slot, context):
            yield msg

    def _template(self, ae: AsyncEngine) -> Any:
        key = id(ae.engine)
        if key not in self._templates:
            try:
                from runtime.chat_template import ChatTemplate
            except ImportError as e:
                raise RpcError(
                    grpc.StatusCode.UNIMPLEMENTED, "chat templates are not available yet"
                ) from e
            self._templates = {
                key: ChatTemplate.from_metadata(
                    ae.engine.loaded.gguf.metadata, self._chat_template_override
                )
            }
        return self._templates[key]

    # -- tokens --------------------------------------------------------------------------------

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: aio.ServicerContext
    ) -> pb.TokenizeResponse:
        tok = self._engine().engine.tokenizer
        ids = tok.encode(
            request.text,
            add_special=request.add_special if request.HasField("add_special") else False,
            parse_special=request.parse_special if request.HasField("parse_special") else True,
        )
        out = pb.TokenizeResponse(tokens=ids)
        if request.with_pieces:
            for t in ids:
                raw = tok.token_to_piece(t)
                out.pieces.add(id=t, piece=raw.decode("utf-8", errors="replace"), piece_bytes=raw)
        return out

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        tok = self._engine().engine.tokenizer
        ids = conv.check_token_ids(request.tokens, tok.vocab_size)
        return pb.DetokenizeResponse(text=tok.decode(ids, skip_special=request.skip_special))

    async def Embed(
        self, request: pb.EmbedRequest, context: aio.ServicerContext
    ) -> pb.EmbedResponse:
        ae = self._engine()
        pooling = ae.engine.embedding_pooling()  # UNIMPLEMENTED without --embeddings
        if pooling is Pooling.NONE:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "pooling type 'none' gives one vector per token; start the server with "
                "--pooling mean, cls or last",
            )
        prompts = conv.embed_prompts(request, ae.engine.tokenizer)
        # The answer must fit one message: 4 bytes a float plus a little framing per vector.
        max_inputs = self._max_message_bytes // (4 * ae.engine.loaded.config.hidden + 16) - 1
        if len(prompts) > max_inputs:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"inputs: at most {max_inputs} per call (the message size limit), got {len(prompts)}",
            )
        outs = await ae.embed_many(prompts, ae.engine.cfg.n_parallel)
        norm = 2 if not request.HasField("normalize") or request.normalize else -1
        res = pb.EmbedResponse()
        for o in outs:
            assert o.embedding is not None
            res.embeddings.add(values=normalize(o.embedding, norm)[0].tolist())
        res.usage.prompt_tokens = sum(o.num_prompt_tokens for o in outs)
        return res

    # -- model and slots -----------------------------------------------------------------------

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        ae = self._engine()
        e = ae.engine
        md = e.loaded.gguf.metadata
        mc = e.loaded.config
        tok = e.tokenizer
        ftype = md.get("general.file_type")
        return pb.ModelInfoResponse(
            model_path=str(e.cfg.model_path),
            alias=self._alias or Path(e.cfg.model_path).name,
            name=str(md.get("general.name", "")),
            architecture=mc.arch,
            context_length=mc.context_length,
            n_ctx=e.max_seq_len,
            vocab_size=mc.vocab_size,
            n_layers=mc.n_layers,
            n_embd=mc.hidden,
            file_type=_file_type_name(ftype),
            file_type_id=ftype if isinstance(ftype, int) else 0,
            slots=e.cfg.n_parallel,
            bos_token_id=-1 if tok.bos_id is None else tok.bos_id,
            eos_token_id=-1 if tok.eos_id is None else tok.eos_id,
            add_bos=bool(tok.add_bos),
            device=str(e.loaded.device),
            dtype=e.cfg.dtype,
            chat_template=self._template(ae).name,
        )

    async def ListSlots(
        self, request: pb.ListSlotsRequest, context: aio.ServicerContext
    ) -> pb.ListSlotsResponse:
        ae = self._engine()
        slots = await ae.call(_slots)
        return pb.ListSlotsResponse(slots=slots)

    async def EraseSlot(
        self, request: pb.EraseSlotRequest, context: aio.ServicerContext
    ) -> pb.EraseSlotResponse:
        n = await self._engine().call(lambda e: erase_slot(e, request.id_slot))
        return pb.EraseSlotResponse(id_slot=request.id_slot, n_erased=n)

    async def SaveSlot(
        self, request: pb.SaveSlotRequest, context: aio.ServicerContext
    ) -> pb.SaveSlotResponse:
        r = await self._engine().call(lambda e: save_slot(e, request.id_slot, request.filename))
        return pb.SaveSlotResponse(
            id_slot=r.id_slot,
            filename=r.filename,
            n_saved=r.n_tokens,
            n_written=r.n_bytes,
            save_ms=r.ms,
        )

    async def RestoreSlot(
        self, request: pb.RestoreSlotRequest, context: aio.ServicerContext
    ) -> pb.RestoreSlotResponse:
        r = await self._engine().call(lambda e: restore_slot(e, request.id_slot, request.filename))
        return pb.RestoreSlotResponse(
            id_slot=r.id_slot,
            filename=r.filename,
            n_restored=r.n_tokens,
            n_read=r.n_bytes,
            restore_ms=r.ms,
        )


def _slots(engine: Any) -> list[pb.Slot]:
    """Runs on the engine thread: each slot and the request in it."""
    slots = [pb.Slot(id=i) for i in range(engine.cfg.n_parallel)]
    for req in engine.scheduler.running:
        if 0 <= req.slot_id < len(slots):
            s = slots[req.slot_id]
            s.is_processing = True
            s.request_id = req.request_id
            s.n_prompt_tokens = len(req.prompt_token_ids)
            s.n_decoded = len(req.output_token_ids)
    return slots


def _file_type_name(ftype: object) -> str:
    """general.file_type as llama.cpp names it (gguf's LlamaFileType), e.g. MOSTLY_Q4_K_M."""
    if not isinstance(ftype, int):
        return ""
    try:
        from gguf import LlamaFileType

        return LlamaFileType(ftype).name
    except (ImportError, ValueError):
        return str(ftype)
