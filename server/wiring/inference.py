"""The inference stack, built the same way by both processes: the serving process for its RPCs,
the job worker process for the jobs it runs. Built here so that whatever the stack needs next
(a client credential for Triton, a new pipeline) is added once."""

from __future__ import annotations

from dataclasses import dataclass

from grpc_health.v1.health import aio as health_aio

from server.cache.result_cache import ResultCache, result_cache_for
from server.config import ServerConfig
from server.metrics import Metrics
from server.pipelines.detection import DetectionPipeline
from server.pipelines.matting import MattingPipeline
from server.sam2.image_predictor import ImagePredictor
from server.sam2.video_predictor import VideoPredictor
from server.services import CACHED_MODELS
from server.triton.client import TritonClient
from server.triton.monitor import TritonMonitor
from server.triton.runner import InferenceRunner

__all__ = ["InferenceStack", "build_inference_stack", "shared_memory_slots"]


@dataclass
class InferenceStack:
    """One process's connection to Triton and the pipelines over it."""

    metrics: Metrics
    client: TritonClient
    monitor: TritonMonitor
    runner: InferenceRunner
    result_cache: ResultCache | None
    detection: DetectionPipeline
    image_predictor: ImagePredictor
    matting: MattingPipeline
    video_predictor: VideoPredictor

    async def open_cache(self, *, clear: bool) -> None:
        """The serving process clears the replica's cache file before its job worker (which
        opens the same file, without clearing it) starts: see server/cache."""
        if self.result_cache is not None:
            await self.result_cache.open(clear=clear)

    async def close(self) -> None:
        """After the monitor has stopped and nothing calls the pipelines any more."""
        await self.runner.close()
        await self.client.close()
        if self.result_cache is not None:
            await self.result_cache.close()


def shared_memory_slots(config: ServerConfig, *, managed_triton: bool) -> int:
    """Shared-memory slots per model for the serving process (0: tensors travel inside the gRPC
    messages). ``auto`` uses them only with the managed Triton, the one sure to share this
    host's /dev/shm."""
    use = config.triton_shm == "on" or (config.triton_shm == "auto" and managed_triton)
    return config.triton_shm_slots if use else 0


def build_inference_stack(
    config: ServerConfig,
    metrics: Metrics,
    *,
    triton_url: str,
    shm_slots: int,
    service_models: dict[str, tuple[str, ...]],
    health: health_aio.HealthServicer,
    degradable_models: tuple[str, ...] = (),
) -> InferenceStack:
    """Client, monitor, runner, result cache, pipelines: in that order, nothing connected yet
    (the caller opens the cache and starts the monitor when its process is ready).
    ``service_models``: what the monitor reports health for (the serving process: every
    service; the job worker: the jobs' models only, its health being the serving process's)."""
    client = TritonClient(triton_url, metrics=metrics, default_timeout_s=config.triton_timeout_s)
    monitor = TritonMonitor(
        client,
        service_models,
        health,
        metrics,
        interval_s=config.health_interval_s,
        degradable_models=degradable_models,
        reread_models=CACHED_MODELS,
    )
    runner = InferenceRunner(
        client, metrics, shm_slots_per_model=shm_slots, shm_idle_release_s=config.triton_shm_idle_release_s
    )
    # One cache file per replica, shared by its two processes: what a job computes, an RPC
    # finds, and the other way round.
    cache = result_cache_for(config, metrics)
    pixels = config.max_image_pixels
    return InferenceStack(
        metrics=metrics,
        client=client,
        monitor=monitor,
        runner=runner,
        result_cache=cache,
        detection=DetectionPipeline(runner, monitor, metrics, max_pixels=pixels, cache=cache),
        image_predictor=ImagePredictor(runner, monitor, max_pixels=pixels),
        matting=MattingPipeline(runner, monitor, max_pixels=pixels, metrics=metrics, cache=cache),
        video_predictor=VideoPredictor(runner, monitor, max_pixels=pixels, max_objects=config.max_objects_per_session),
    )
