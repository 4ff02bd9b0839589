"""The gRPC services this server offers and the Triton models each one needs.

Both processes read these: the serving process (health, reflection, the result cache) and the
job worker process (its own view of the models its jobs call).
"""

from __future__ import annotations

from framewise.v1 import info_service_pb2, jobs_service_pb2, tracking_service_pb2, vision_service_pb2
from server.pipelines.matting import MODEL_NAME as MATTING
from server.sam2 import contract as sam2

__all__ = ["CACHED_MODELS", "JOB_DEGRADABLE_MODELS", "OPERATIONS_SERVICE", "SERVICES", "SERVICE_MODELS"]

OPERATIONS_SERVICE = "google.longrunning.Operations"
SERVICES = {
    "vision": vision_service_pb2.DESCRIPTOR.services_by_name["VisionService"],
    "tracking": tracking_service_pb2.DESCRIPTOR.services_by_name["TrackingService"],
    "jobs": jobs_service_pb2.DESCRIPTOR.services_by_name["JobService"],
    "info": info_service_pb2.DESCRIPTOR.services_by_name["InfoService"],
}
# Models each service's implemented RPCs need: a service is SERVING only while its models are
# ready, the server as a whole ("") only while all of them are.
SERVICE_MODELS = {
    SERVICES["vision"].full_name: ("yolov8", MATTING, sam2.IMAGE_ENCODER, sam2.MASK_DECODER),
    SERVICES["tracking"].full_name: sam2.TRACKING_MODELS,
    # Jobs queue and retry, but cannot progress without their models. Matting is not one of
    # them: without it a talking video goes on with the plain crop (graceful degradation).
    SERVICES["jobs"].full_name: ("yolov8", *sam2.TRACKING_MODELS),
    SERVICES["info"].full_name: (),
}
# Models the jobs use but can go on without (graceful degradation to the plain crop).
JOB_DEGRADABLE_MODELS = (MATTING,)
# Models whose results the result cache keeps: both processes' monitors read their specs again
# on every refresh, so a reload in Triton changes the cache keys within one health interval.
CACHED_MODELS = ("yolov8", MATTING)
