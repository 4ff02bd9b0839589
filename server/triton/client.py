"""The one door to Triton: async KServe v2 gRPC calls with timeouts and error mapping."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from server.errors import DeadlineExceeded, ServiceError, Unavailable
from server.metrics import Metrics
from server.triton.model_spec import ModelSpec
from server.triton.shm import ShmRef, ShmSlotPool

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

    async def close(self) -> None:
        await self._client.close()

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
        infer_inputs = []
        for name, ref in inputs.items():
            infer_input = InferInput(name, list(ref.shape), ref.datatype)
            infer_input.set_shared_memory(ref.region, ref.nbytes, ref.offset)
            infer_inputs.append(infer_input)
        requested = []
        for name, ref in outputs.items():
            output = InferRequestedOutput(name)
            output.set_shared_memory(ref.region, ref.nbytes, ref.offset)
            requested.append(output)
        await self._call(model, infer_inputs, requested, timeout_s)

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
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise DeadlineExceeded(f"no time left for the {model} inference before the call's deadline")
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await self._client.infer(model, inputs, outputs=outputs, client_timeout=timeout)
        except InferenceServerException as exc:
            outcome = _status_name(exc)
            raise _to_service_error(model, exc, timeout) from exc
        finally:
            if self._metrics is not None:
                self._metrics.triton_latency.labels(model, outcome).observe(time.perf_counter() - started)


def _status_name(exc: InferenceServerException) -> str:
    status = (exc.status() or "").replace("StatusCode.", "")
    return status or "UNKNOWN"


def _to_service_error(model: str, exc: InferenceServerException, timeout: float) -> ServiceError:
    status = _status_name(exc)
    if status == "UNAVAILABLE":
        return Unavailable(f"Triton is unavailable ({exc.message()}); retry shortly")
    if status == "DEADLINE_EXCEEDED":
        return DeadlineExceeded(f"the {model} inference did not finish within {timeout:.3f} s")
    if status == "CANCELLED":
        return ServiceError("the inference was cancelled", code=grpc.StatusCode.CANCELLED)
    # Triton rejected a request the orchestrator built: a bug or a repository mismatch, not the
    # caller's fault.
    return ServiceError(f"Triton rejected the {model} request ({status}: {exc.message()})")
