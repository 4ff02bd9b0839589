"""The one door to Triton: async KServe v2 gRPC calls with timeouts and error mapping."""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from server.errors import DeadlineExceeded, ServiceError, Unavailable
from server.metrics import Metrics
from server.triton.model_spec import ModelSpec
from server.triton.shm import ShmRef, ShmSlotPool
from server.triton.stream import InferStream, StreamFailure

T = TypeVar("T")

# Reconnect quickly after Triton comes back: gRPC's default backoff grows to two minutes,
# which would keep the service unavailable long after Triton is ready again.
_CHANNEL_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


class TritonClient:
    def __init__(
        self, url: str, *, metrics: Metrics | None = None, default_timeout_s: float = 30.0, control_timeout_s: float = 5.0
    ) -> None:
        self.url = url
        self.default_timeout_s = default_timeout_s
        self.control_timeout_s = control_timeout_s
        self._metrics = metrics
        self._client = triton_aio.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)
        # The shared-memory hot path (tracking: two calls per frame) bypasses tritonclient: its
        # requests depend only on where the tensors sit, so each is built and serialised once
        # per slot and shape (ShmRequests) and sent as bytes on one ModelStreamInfer stream of
        # our own channel (InferStream).
        self._channel = grpc.aio.insecure_channel(url, options=_CHANNEL_ARGS)
        self._stream = InferStream(self._channel)
        self._shm_requests = ShmRequests()

    async def close(self) -> None:
        await self._stream.close()
        await self._client.close()
        await self._channel.close()

    async def is_server_ready(self) -> bool:
        return await self._client.is_server_ready(client_timeout=self.control_timeout_s)

    async def is_server_live(self) -> bool:
        return await self._client.is_server_live(client_timeout=self.control_timeout_s)

    async def is_model_ready(self, name: str) -> bool:
        return await self._client.is_model_ready(name, client_timeout=self.control_timeout_s)

    async def server_version(self) -> str:
        metadata = await self._client.get_server_metadata(client_timeout=self.control_timeout_s)
        return metadata.version

    async def model_spec(self, name: str) -> ModelSpec:
        metadata = await self._client.get_model_metadata(name, client_timeout=self.control_timeout_s)
        config = await self._client.get_model_config(name, client_timeout=self.control_timeout_s)
        return ModelSpec.from_triton(metadata, config.config)

    async def statistics(self, name: str = "") -> service_pb2.ModelStatisticsResponse:
        return await self._client.get_inference_statistics(name, client_timeout=self.control_timeout_s)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """One inference request with the tensors in the message; raises ServiceError subclasses."""
        infer_inputs = []
        for name, array in inputs.items():
            tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            infer_inputs.append(tensor)
        result = await self._call(model, infer_inputs, [InferRequestedOutput(name) for name in outputs], timeout_s)
        return {name: result.as_numpy(name) for name in outputs}

    async def infer_in_shared_memory(
        self,
        model: str,
        inputs: Mapping[str, ShmRef],
        outputs: Mapping[str, ShmRef],
        *,
        timeout_s: float | None = None,
    ) -> None:
        """One inference whose tensors all live in registered shared-memory regions: Triton reads
        the inputs and writes the outputs at the given offsets; no tensor bytes cross the socket."""
        request = self._shm_requests.get(model, inputs, outputs)
        await self._timed(model, timeout_s, lambda timeout: self._stream.infer(request, timeout))

    async def register_shared_memory(self, pool: ShmSlotPool) -> None:
        await self._client.register_system_shared_memory(
            pool.region, pool.key, pool.byte_size, client_timeout=self.control_timeout_s
        )

    async def shared_memory_status(self, region: str) -> bool:
        """Whether Triton has this system shared-memory region registered."""
        try:
            status = await self._client.get_system_shared_memory_status(region, client_timeout=self.control_timeout_s)
        except InferenceServerException:
            return False
        return region in status.regions

    async def unregister_shared_memory(self, region: str) -> None:
        await self._client.unregister_system_shared_memory(region, client_timeout=self.control_timeout_s)

    async def _call(
        self, model: str, inputs: list[InferInput], outputs: list[InferRequestedOutput], timeout_s: float | None
    ):  # noqa: ANN202 - tritonclient's InferResult
        return await self._timed(
            model, timeout_s, lambda timeout: self._client.infer(model, inputs, outputs=outputs, client_timeout=timeout)
        )

    async def _timed(self, model: str, timeout_s: float | None, call: Callable[[float], Awaitable[T]]) -> T:
        """One inference, either route: the deadline check, Triton's errors as ServiceErrors,
        and the latency metric by outcome."""
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise DeadlineExceeded(f"no time left for the {model} inference before the call's deadline")
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await call(timeout)
        except StreamFailure as exc:
            outcome = exc.status
            raise _status_error(model, exc.status, exc.message, timeout) from exc
        except InferenceServerException as exc:
            outcome = _status_name(exc)
            raise _status_error(model, outcome, exc.message() or "", timeout) from exc
        finally:
            if self._metrics is not None:
                self._metrics.triton_latency.labels(model, outcome).observe(time.perf_counter() - started)


def _status_name(exc: InferenceServerException) -> str:
    status = (exc.status() or "").replace("StatusCode.", "")
    return status or "UNKNOWN"


# What Triton answers, with another status than UNAVAILABLE, when it is going down or a model's
# instance died under a request (stopped mid-frame, a python-backend stub killed): the request
# was fine and a retry after Triton's restart succeeds, so the caller gets UNAVAILABLE, not
# INTERNAL.
_TRITON_GOING_AWAY = ("server is stopping", "stub process", "is not healthy", "unknown model", "is not ready", "unloading")


def _status_error(model: str, status: str, message: str, timeout: float) -> ServiceError:
    if status == "UNAVAILABLE" or any(marker in message.lower() for marker in _TRITON_GOING_AWAY):
        return Unavailable(f"Triton is unavailable ({message}); retry shortly")
    if status == "DEADLINE_EXCEEDED":
        return DeadlineExceeded(f"the {model} inference did not finish within {timeout:.3f} s")
    if status == "CANCELLED":
        return ServiceError("the inference was cancelled", code=grpc.StatusCode.CANCELLED)
    # Triton rejected a request the orchestrator built: a bug or a repository mismatch, not the
    # caller's fault.
    return ServiceError(f"Triton rejected the {model} request ({status}: {message})")


class ShmRequests:
    """Serialised ModelInferRequests for shared-memory inferences, by model and tensor places.

    A shared-memory request names, per tensor, its region, offset, byte size, shape and dtype,
    nothing else: a slot used again with the same shapes sends the same bytes. Built as
    tritonclient's set_shared_memory does (the KServe shared-memory parameters)."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._requests: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()

    def get(self, model: str, inputs: Mapping[str, ShmRef], outputs: Mapping[str, ShmRef]) -> bytes:
        key = (
            model,
            tuple((name, ref.region, ref.offset, ref.nbytes, ref.shape, ref.datatype) for name, ref in inputs.items()),
            tuple((name, ref.region, ref.offset, ref.nbytes) for name, ref in outputs.items()),
        )
        request = self._requests.get(key)
        if request is None:
            request = self._build(model, inputs, outputs)
            self._requests[key] = request
            if len(self._requests) > self.capacity:
                self._requests.popitem(last=False)
        return request

    @staticmethod
    def _build(model: str, inputs: Mapping[str, ShmRef], outputs: Mapping[str, ShmRef]) -> bytes:
        request = service_pb2.ModelInferRequest(model_name=model)
        for name, ref in inputs.items():
            _place(request.inputs.add(name=name, datatype=ref.datatype, shape=list(ref.shape)).parameters, ref)
        for name, ref in outputs.items():
            _place(request.outputs.add(name=name).parameters, ref)
        return request.SerializeToString()


def _place(parameters, ref: ShmRef) -> None:  # noqa: ANN001 - protobuf map
    parameters["shared_memory_region"].string_param = ref.region
    parameters["shared_memory_byte_size"].int64_param = ref.nbytes
    if ref.offset:
        parameters["shared_memory_offset"].int64_param = ref.offset
