"""`build_engines.py --target onnx` calls the exporters in engines/export/ the way their signatures
say, and the SAM 2 parts' contract check it runs after an export.

The export itself needs torch, which this suite's environment never has: the export environment
runs it for real (parity/test_build_engines_onnx.py, in `make parity`). What can break without torch
is checked here, cheaply: build_engines.py's source is read (ast) and every call it makes into an
engines.export module is bound to that function's real signature (the exporter modules import
without torch: onnx + numpy, torch only inside their functions). A call like
`export_parts(model, output, source=...)` against `export_parts(output, *, ...)` fails here.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import build_engines
from engines import sam2_standin
from engines.export import sam2_parts

SOURCE = Path(build_engines.__file__)
# Every exporter build_engines.py --target onnx runs; the test fails if one is no longer found,
# so a renamed call cannot leave the check with nothing to look at.
EXPORTERS = {("engines.export.yolo", "export_yolov8"), ("engines.export.yolo", "export_yolov8_end2end"),
             ("engines.export.birefnet", "export_birefnet"), ("engines.export.sam2_parts", "export_parts")}


@dataclass
class ExporterCall:
    module: str
    function: str
    line: int
    positional: list[ast.expr]
    keywords: dict[str, ast.expr]


def _exporter_calls() -> list[ExporterCall]:
    """Calls of functions imported from engines.export.* (``from engines.export.m import f``, then
    ``f(...)``; ``from engines.export import m``, then ``m.f(...)``), with ``**name`` expanded
    where ``name`` is a dict literal assigned in the same function."""
    tree = ast.parse(SOURCE.read_text(), filename=str(SOURCE))
    calls: dict[tuple[int, int], ExporterCall] = {}
    for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        functions: dict[str, tuple[str, str]] = {}
        modules: dict[str, str] = {}
        dicts: dict[str, ast.Dict] = {}
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engines.export"):
                for alias in node.names:
                    if node.module == "engines.export":
                        modules[alias.asname or alias.name] = f"engines.export.{alias.name}"
                    else:
                        functions[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                dicts.update({t.id: node.value for t in node.targets if isinstance(t, ast.Name)})
        for node in ast.walk(func):
            if not isinstance(node, ast.Call):
                continue
            target = None
            if isinstance(node.func, ast.Name) and node.func.id in functions:
                target = functions[node.func.id]
            elif (isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                  and node.func.value.id in modules):
                target = (modules[node.func.value.id], node.func.attr)
            if target is None:
                continue
            assert not any(isinstance(a, ast.Starred) for a in node.args), f"line {node.lineno}: *args not checked"
            keywords: dict[str, ast.expr] = {}
            for kw in node.keywords:
                if kw.arg is not None:
                    keywords[kw.arg] = kw.value
                    continue
                splat = dicts.get(kw.value.id) if isinstance(kw.value, ast.Name) else None
                assert splat is not None, f"line {node.lineno}: **{ast.unparse(kw.value)} is not a dict literal here"
                for key, value in zip(splat.keys, splat.values):
                    assert isinstance(key, ast.Constant), f"line {node.lineno}: a non-constant key in the ** dict"
                    keywords[key.value] = value
            calls[(node.lineno, node.col_offset)] = ExporterCall(*target, node.lineno, list(node.args), keywords)
    return list(calls.values())


def test_every_exporter_call_matches_the_exporters_signature():
    calls = _exporter_calls()
    assert EXPORTERS <= {(c.module, c.function) for c in calls}, "an exporter call went missing from build_engines.py"
    for call in calls:
        function = getattr(importlib.import_module(call.module), call.function)
        try:
            inspect.signature(function).bind(*call.positional, **call.keywords)
        except TypeError as exc:
            pytest.fail(f"build_engines.py line {call.line}: {call.module}.{call.function}"
                        f"{inspect.signature(function)} cannot take this call: {exc}")


def test_sam2_export_is_sized_by_the_flag():
    """--sam2-image-size reaches the exporter (it used to be ignored for a real export)."""
    (call,) = [c for c in _exporter_calls() if c.function == "export_parts"]
    assert "image_size" in call.keywords, "export_parts is called without image_size"
    assert ast.unparse(call.keywords["image_size"]) == "args.sam2_image_size"
    assert "image_size" in inspect.signature(sam2_parts.export_parts).parameters


def test_the_signature_check_sees_a_bad_call():
    """The check above would have caught the original bug: the old call does not bind."""
    old_call = ast.parse("export_parts(model, output, source=source, check=True, seed=args.seed, log=log)").body[0]
    assert isinstance(old_call, ast.Expr) and isinstance(old_call.value, ast.Call)
    with pytest.raises(TypeError):
        inspect.signature(sam2_parts.export_parts).bind(*old_call.value.args,
                                                        **{k.arg: k.value for k in old_call.value.keywords})


@pytest.mark.parametrize("part", sam2_standin.PARTS, ids=lambda p: p.name)
def test_sam2_contract_check_follows_the_model_size(tmp_path, part):
    """contract_mismatches, run by --target onnx on each exported part: the contract at S (the
    stand-in of that name, which is what --target cpu --sam2-onnx-dir demands), not a fixed 1024."""
    path = tmp_path / f"{part.name}.onnx"
    onnx.save(part.build(256), str(path))
    assert sam2_parts.contract_mismatches(path, 256) == []
    problems = sam2_parts.contract_mismatches(path, 512)
    assert problems and all("S=512" in p for p in problems)


def test_sam2_contract_check_refuses_a_renamed_tensor(tmp_path):
    model = sam2_standin.PARTS[0].build(256)
    model.graph.input[0].name = "pixels"
    for node in model.graph.node:
        node.input[:] = ["pixels" if i == "image" else i for i in node.input]
    path = tmp_path / f"{sam2_standin.PARTS[0].name}.onnx"
    onnx.save(model, str(path))
    (problem,) = sam2_parts.contract_mismatches(path, 256)
    assert "pixels" in problem and "image" in problem
