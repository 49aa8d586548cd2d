"""plan() is pure: the same spec gives the same steps, shared steps are merged, and each change
lands in the params of exactly the steps it should rebuild."""

from __future__ import annotations


from workspaces import RESOLVED, ROOT, make_plan


def test_one_target_expands_to_its_rule_chain():
    p = make_plan()
    mine = [s for s in p.steps if "onnx_fp32" in s.targets]  # (export and simplify shared with onnx_fp16)
    assert [s.rule for s in mine] == ["reference_outputs", "export_onnx", "simplify_onnx", "validate"]
    assert mine[1].name == "bert/onnx_fp32+6more/export_onnx"  # shared by the five onnx and two openvino targets
    reference, export, simplify, validate_step = mine
    assert simplify.deps == [export.id] and set(validate_step.deps) == {simplify.id, reference.id}
    assert validate_step.outputs["artifact"] == ROOT / "build/bert/onnx_fp32/model.onnx"
    assert export.outputs["model"].parent.parent == ROOT / "build/.steps"
    assert p.artifacts()[0] == ("onnx_fp32", ROOT / "build/bert/onnx_fp32/model.onnx")


def test_a_safetensors_target_writes_weights_then_validates_them_in_torch():
    p = make_plan()
    chain = [s for s in p.steps if s.targets == ["safetensors_fp16"]]
    assert [s.rule for s in chain] == ["write_safetensors", "validate"]
    write, check = chain
    assert write.params["precision"] == "fp16" and check.params["format"] == "safetensors"
    assert check.inputs["source"] == RESOLVED.source_files  # the architecture weights are loaded into
    assert check.outputs["artifact"] == ROOT / "build/bert/safetensors_fp16/model.safetensors"
    assert check.params["thresholds"]["min_cosine"] == 0.999  # the fp16 default


def test_planning_is_deterministic():
    assert [(s.id, s.params) for s in make_plan().steps] == [(s.id, s.params) for s in make_plan().steps]


def test_identical_steps_of_two_targets_are_one_step():
    p = make_plan(lambda d: d["targets"].__setitem__("raw", {"format": "onnx", "opset": 17, "options": {"simplify": False}}))
    exports = [s for s in p.steps if s.rule == "export_onnx"]
    assert len(exports) == 1 and exports[0].targets == ["onnx_fp32", "onnx_fp16", "onnx_int8", "onnx_int8_static", "onnx_int4", "openvino_fp32", "openvino_fp16", "raw"]
    assert exports[0].name == "bert/onnx_fp32+7more/export_onnx"
    assert len([s for s in p.steps if s.rule == "reference_outputs"]) == 1
    assert len([s for s in p.steps if s.rule == "validate"]) == len(p.artifacts()) == 13  # one per target


def test_thresholds_only_reach_the_validate_step():
    before = {s.name: s.id for s in make_plan().steps}
    after = {s.name: s.id for s in make_plan(lambda d: d["targets"]["onnx_fp32"]["thresholds"].__setitem__("min_cosine", 0.99)).steps}
    assert [name for name in before if before[name] != after[name]] == ["bert/onnx_fp32/validate"]


def test_opset_reaches_export_and_everything_after_it_but_not_the_reference():
    before = {s.rule: s for s in make_plan().steps if "onnx_fp32" in s.targets}
    after = {s.rule: s for s in make_plan(lambda d: d["targets"]["onnx_fp32"].__setitem__("opset", 18)).steps if "onnx_fp32" in s.targets}
    assert after["export_onnx"].params["opset"] == 18 and after["export_onnx"].id != before["export_onnx"].id
    assert after["reference_outputs"].id == before["reference_outputs"].id


def test_fp16_adds_a_conversion_after_the_shared_simplify():
    chain = [s for s in make_plan().steps if "onnx_fp16" in s.targets]
    assert [s.rule for s in chain] == ["reference_outputs", "export_onnx", "simplify_onnx", "convert_fp16", "validate"]
    assert chain[3].params == {"keep_io_types": True, "keep_fp32_ops": []}


def test_int8_adds_dynamic_quantization_after_the_shared_simplify():
    plain = make_plan(lambda d: d["targets"]["onnx_int8"].update(options={"quantization": "dynamic"}, thresholds={}))
    chain = [s for s in plain.steps if "onnx_int8" in s.targets]
    assert [s.rule for s in chain] == ["reference_outputs", "export_onnx", "simplify_onnx", "quantize_dynamic", "validate"]
    assert chain[-1].params["thresholds"]["min_cosine"] == 0.9  # the int8 default
    assert chain[3].params["embeddings"] == "int8" and "fallback" not in chain[3].params and "reference" not in chain[3].inputs


def test_smoothing_adds_its_steps_and_the_fallback_its_scan_settings_and_gates_to_the_quantize_step():
    p = make_plan()
    chain = [s for s in p.steps if "onnx_int8" in s.targets]
    assert [s.rule for s in chain] == ["reference_outputs", "export_onnx", "simplify_onnx", "calibrate", "smooth_onnx", "quantize_dynamic", "validate"]
    reference, _, simplify, calibrate, smooth, quantize, _ = chain
    assert smooth.params["alpha"] == 0.7 and smooth.inputs["channels"] == (calibrate.outputs["channels"],)
    # the scan runs inside the quantize step, and only when the all-quantized model fails the gates
    assert quantize.inputs["model"] == (smooth.outputs["model"],) and quantize.inputs["reference"] == (reference.outputs["outputs"],)
    assert quantize.params["fallback"]["scan"] == {"quantization": "dynamic", "max_samples": 64} and reference.id in quantize.deps
    assert quantize.params["fallback"]["goal"] == {"min_cosine": 0.98, "mean_cosine": 0.98}  # the target's gates over the defaults
    assert not [s for s in p.steps if s.rule == "scan_layers"]
    stricter = make_plan(lambda d: d["targets"]["onnx_int8"].update(thresholds={"min_cosine": 0.985}))
    before = {s.id for s in p.steps}
    assert sorted(s.rule for s in stricter.steps if s.id not in before) == ["quantize_dynamic", "validate"]
    changed = next(s for s in stricter.steps if s.rule == "quantize_dynamic" and "onnx_int8" in s.targets)
    assert changed.params["fallback"]["scan"] == quantize.params["fallback"]["scan"]  # the same scan memo: not paid again


def test_two_targets_quantizing_alike_scan_alike_whatever_their_gates():
    """The scan memo's key is the model, the data and the scan settings: equal here, so one scan serves both."""
    p = make_plan(lambda d: d["targets"].__setitem__("strict", dict(d["targets"]["onnx_int8"], thresholds={"min_cosine": 0.99})))
    ours, strict = ([s for s in p.steps if s.rule == "quantize_dynamic" and target in s.targets] for target in ("onnx_int8", "strict"))
    assert len(ours) == len(strict) == 1 and ours[0].id != strict[0].id
    assert ours[0].params["fallback"]["scan"] == strict[0].params["fallback"]["scan"] and ours[0].inputs == strict[0].inputs
    assert ours[0].params["fallback"]["goal"] != strict[0].params["fallback"]["goal"]
    quantizers = [s for s in p.steps if s.rule.startswith("quantize_") and "fallback" in s.params]
    assert {s.params["fallback"]["scan"]["quantization"] for s in quantizers} == {"dynamic", "static", "int4"}


def test_static_smoothing_calibrates_the_fp32_model_then_the_smoothed_one():
    chain = [s for s in make_plan().steps if "onnx_int8_static" in s.targets]
    rules = [s.rule for s in chain]
    assert rules == ["reference_outputs", "export_onnx", "simplify_onnx", "calibrate", "smooth_onnx", "calibrate", "quantize_static", "validate"]
    first, smooth, second, quantize = chain[3], chain[4], chain[5], chain[6]
    assert first.targets == ["onnx_int8", "onnx_int8_static"]  # one calibration feeds both smoothings
    assert second.inputs["model"] == (smooth.outputs["model"],) and quantize.inputs["calibration"] == (second.outputs["calibration"],)
    scan = quantize.params["fallback"]["scan"]  # the scan's ranges: the calibration by this target's method
    assert scan["quantization"] == "static" and (scan["method"], scan["activation_type"]) == (quantize.params["method"], quantize.params["activation_type"])


def plain_quantization(d):
    """The bert manifest's quantized targets without smoothing, fallback or raised gates."""
    d["targets"]["onnx_int8"].update(options={"quantization": "dynamic"}, thresholds={})
    d["targets"]["onnx_int8_static"].update(options={"quantization": "static", "calibration": "percentile", "percentile": 99.999}, thresholds={})
    d["targets"]["onnx_int4"].update(options={"block_size": 32}, thresholds={})


def test_static_int8_calibrates_once_for_every_static_target_whatever_its_method():
    def two_static(d):
        plain_quantization(d)
        d["targets"]["entropy"] = {"format": "onnx", "precision": "int8", "options": {"quantization": "static", "calibration": "entropy"}}
    p = make_plan(two_static)
    chain = [s for s in p.steps if "onnx_int8_static" in s.targets]
    assert [s.rule for s in chain] == ["reference_outputs", "export_onnx", "simplify_onnx", "calibrate", "quantize_static", "validate"]
    calibrate, quantize = chain[3], chain[4]
    assert calibrate.targets == ["onnx_int8_static", "entropy"] and [s.rule for s in p.steps].count("calibrate") == 1
    assert calibrate.inputs["data"] == (ROOT / "manifests/data/calibration.txt",) and calibrate.params["bins"] == 2048
    assert quantize.deps == [chain[2].id, calibrate.id] and quantize.params["method"] == "percentile"
    assert [s.params["method"] for s in p.steps if s.rule == "quantize_static"] == ["percentile", "entropy"]


def test_calibration_settings_reach_calibrate_and_exclusions_only_quantize():
    base = {s.id: s.rule for s in make_plan(plain_quantization).steps}
    more = {s.id: s.rule for s in make_plan(lambda d: (plain_quantization(d), d["calibration"].__setitem__("max_samples", 64))).steps}
    assert sorted(base[i] for i in set(base) - set(more)) == ["calibrate", "quantize_static", "validate"]
    excl = {s.id: s.rule for s in make_plan(lambda d: (plain_quantization(d), d["targets"]["onnx_int4"]["options"].__setitem__("exclude_nodes", ["Gemm_1"]))).steps}
    assert sorted(base[i] for i in set(base) - set(excl)) == ["quantize_int4", "validate"]


def test_int4_packs_after_the_shared_simplify():
    plain = make_plan(lambda d: d["targets"]["onnx_int4"].update(options={"block_size": 32}, thresholds={}))
    chain = [s for s in plain.steps if "onnx_int4" in s.targets]
    assert [s.rule for s in chain] == ["reference_outputs", "export_onnx", "simplify_onnx", "quantize_int4", "validate"]
    assert chain[3].params == {"block_size": 32, "symmetric": False, "accuracy_level": 4, "embeddings": "int8"}
    assert chain[-1].params["thresholds"]["min_cosine"] == 0.8  # the int4 default
    scanned = [s.params["fallback"]["scan"] for s in make_plan().steps if "onnx_int4" in s.targets and s.rule == "quantize_int4"]
    assert [(s["quantization"], s["block_size"], s["accuracy_level"]) for s in scanned] == [("int4", 32, 0)]


def test_torch_programs_export_from_the_source_and_validate_with_positional_inputs():
    p = make_plan()
    for target, rule, file in (("torchscript", "export_torchscript", "model.pt"), ("torch_export", "export_torch_export", "model.pt2")):
        chain = [s for s in p.steps if target in s.targets]
        assert [s.rule for s in chain] == ["reference_outputs", rule, "validate"]
        assert chain[1].outputs["model"].name == file and chain[2].outputs["artifact"] == ROOT / f"build/bert/{target}/{file}"
        assert [t["name"] for t in chain[2].params["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
        assert "source" not in chain[2].params and "source" not in chain[2].inputs  # the artifact alone is run
    assert [s for s in p.steps if s.rule == "export_torchscript"][0].params["mode"] == "trace"


def test_openvino_converts_the_shared_onnx_and_publishes_both_files():
    p = make_plan()
    chain = [s for s in p.steps if "openvino_fp16" in s.targets]
    assert [s.rule for s in chain] == ["reference_outputs", "export_onnx", "simplify_onnx", "convert_openvino", "validate"]
    convert, validate_step = chain[3], chain[4]
    assert convert.params == {"compress_to_fp16": True}
    assert convert.inputs["model"] == (chain[2].outputs["model"],)
    assert validate_step.inputs["model"] == (convert.outputs["model"], convert.outputs["weights"])
    assert validate_step.outputs["artifact"] == ROOT / "build/bert/openvino_fp16/model.xml"
    assert validate_step.outputs["weights"] == ROOT / "build/bert/openvino_fp16/model.bin"
    assert [s.params for s in p.steps if s.rule == "convert_openvino"] == [{"compress_to_fp16": False}, {"compress_to_fp16": True}]


def _plan_with_source_bytes(size: int, external_data=None):
    """bert's plan as if its source files held `size` bytes (external_data: set on onnx_int8)."""
    import copy
    import dataclasses

    from kiln.define.spec import validate
    from kiln.plan.chains import plan
    from kiln.schema.manifest import RawManifest
    from workspaces import GOOD

    data = copy.deepcopy(GOOD)
    if external_data is not None:
        data["targets"]["onnx_int8"].setdefault("options", {})["external_data"] = external_data
    resolved = dataclasses.replace(RESOLVED, source_bytes=size)
    return plan(validate(RawManifest(ROOT / "manifests/bert.toml", data)), resolved, ROOT / "manifests/bert.toml", ROOT)


def test_external_data_auto_turns_on_above_the_threshold_for_every_onnx_step_of_the_chain():
    from kiln.plan.chains import EXTERNAL_DATA_AUTO_BYTES

    small, big = _plan_with_source_bytes(EXTERNAL_DATA_AUTO_BYTES), _plan_with_source_bytes(EXTERNAL_DATA_AUTO_BYTES + 1)
    assert [s.id for s in small.steps] == [s.id for s in make_plan().steps]  # at the threshold: nothing changes
    chain = [s for s in big.steps if "onnx_int8" in s.targets]
    assert [s.rule for s in chain] == ["reference_outputs", "export_onnx", "calibrate", "smooth_onnx", "quantize_dynamic", "validate"]  # no onnxsim
    _, export, calibrate, smooth, quantize, publish = chain
    for step in (export, smooth, quantize):
        assert step.params["external_data"] is True and step.outputs["data"].name == "model.onnx.data"
    assert calibrate.inputs["model"] == (export.outputs["model"], export.outputs["data"])  # the data's digest keys it
    assert quantize.inputs["model"] == (smooth.outputs["model"], smooth.outputs["data"])  # the scan, when needed, digests both
    assert publish.inputs["model"] == (quantize.outputs["model"], quantize.outputs["data"])
    assert publish.outputs["data"] == ROOT / "build/bert/onnx_int8/model.onnx.data"
    ir = next(s for s in big.steps if s.rule == "convert_openvino")
    assert ir.inputs["model"][1].name == "model.onnx.data"


def test_external_data_false_overrides_auto_and_true_forces_it():
    from kiln.plan.chains import EXTERNAL_DATA_AUTO_BYTES

    off = _plan_with_source_bytes(EXTERNAL_DATA_AUTO_BYTES * 2, external_data=False)
    assert "data" not in next(s for s in off.steps if s.rule == "quantize_dynamic").outputs
    on = _plan_with_source_bytes(0, external_data=True)
    assert next(s for s in on.steps if s.rule == "quantize_dynamic").params["external_data"] is True
    assert "external_data" not in next(s for s in on.steps if s.rule == "convert_fp16").params  # other targets keep theirs
