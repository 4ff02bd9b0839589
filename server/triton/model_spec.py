"""What a Triton model looks like, read from Triton itself (metadata + config), never assumed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tritonclient.grpc import model_config_pb2, service_pb2


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Triton datatype: "UINT8", "FP32", ...
    shape: tuple[int, ...]  # batch dimension included when the model batches; -1 = dynamic


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def stand_in(self) -> bool:
        return self.parameters.get("stand_in", "false").lower() == "true"

    @property
    def source(self) -> str:
        return self.parameters.get("source", "")

    @property
    def network(self) -> str:
        """The network behind the model (config parameter ``network``: "YOLOv8n", "U2-Netp",
        "BiRefNet-lite", ...); a stand-in without one says "stand-in", other models ""."""
        return self.parameters.get("network", "") or ("stand-in" if self.stand_in else "")

    def input(self, name: str | None = None) -> TensorSpec:
        return _find(self.inputs, name, self.name, "input")

    def output(self, name: str | None = None) -> TensorSpec:
        return _find(self.outputs, name, self.name, "output")

    def json_parameter(self, key: str) -> object:
        if key not in self.parameters:
            raise KeyError(f"model {self.name!r} has no config parameter {key!r}")
        return json.loads(self.parameters[key])

    @classmethod
    def from_triton(
        cls, metadata: service_pb2.ModelMetadataResponse, config: model_config_pb2.ModelConfig
    ) -> ModelSpec:
        def tensors(items) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in items)

        return cls(
            name=metadata.name,
            version=max(metadata.versions, key=int) if metadata.versions else "",
            backend=config.backend or config.platform,
            max_batch_size=config.max_batch_size,
            inputs=tensors(metadata.inputs),
            outputs=tensors(metadata.outputs),
            parameters={key: value.string_value for key, value in config.parameters.items()},
        )


def _find(tensors: tuple[TensorSpec, ...], name: str | None, model: str, kind: str) -> TensorSpec:
    if name is None:
        if len(tensors) != 1:
            raise ValueError(f"model {model!r} has {len(tensors)} {kind}s; name the one wanted")
        return tensors[0]
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise ValueError(f"model {model!r} has no {kind} named {name!r}")
