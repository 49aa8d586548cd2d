"""kind = "huggingface": a local Hugging Face model folder (config.json + weights), loaded with the
transformers class the checkpoint was saved as (config.json's `architectures`), a task's auto class
or the class the manifest names; its tokenizer, where the data is text, turns text into inputs.

Every load checks that the checkpoint gave every weight of the class: a weight transformers had to
initialise at random (a pooler a classifier checkpoint never had, the decoder of an encoder-only
checkpoint) would make the reference and every artifact agree on noise.
"""

from __future__ import annotations

import functools

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_serializer

from kiln.errors import StepError, one_line
from kiln.runtime.tokenizer import TOKENIZER_FILES, has_tokenizer
from kiln.schema.fields import Strict
from kiln.sources.base import PICKLE_SUFFIXES, Resolver, check_pickle
from kiln.sources.torch_model import TorchKind

# Files of a Hugging Face folder that do not change the model: documentation and git plumbing.
IGNORED_IN_MODEL_FOLDER = (".md", ".gitattributes", ".gitignore")
# Two sentences of different lengths, so a traced graph sees padding and a real attention mask.
EXAMPLE_TEXT = ["kiln builds model artifacts.", "An example with padding, so the mask is not all ones."]
# Inputs a tokenizer produces: only a model taking one of these gets its export example from text.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# Optimum's task names (optimum.exporters.tasks.TasksManager) -> the transformers auto classes that
# load a model for them, tried in order (the first whose mapping knows the config's model type).
TASK_CLASSES: dict[str, tuple[str, ...]] = {
    "feature-extraction": ("AutoModel",),
    "fill-mask": ("AutoModelForMaskedLM",),
    "text-generation": ("AutoModelForCausalLM",),
    "text2text-generation": ("AutoModelForSeq2SeqLM",),
    "text-classification": ("AutoModelForSequenceClassification",),
    "token-classification": ("AutoModelForTokenClassification",),
    "question-answering": ("AutoModelForQuestionAnswering",),
    "multiple-choice": ("AutoModelForMultipleChoice",),
    "image-classification": ("AutoModelForImageClassification",),
    "image-segmentation": ("AutoModelForImageSegmentation", "AutoModelForSemanticSegmentation"),
    "semantic-segmentation": ("AutoModelForSemanticSegmentation",),
    "object-detection": ("AutoModelForObjectDetection",),
    "depth-estimation": ("AutoModelForDepthEstimation",),
    "masked-im": ("AutoModelForMaskedImageModeling",),
    "image-to-image": ("AutoModelForImageToImage",),
    "image-to-text": ("AutoModelForImageTextToText",),  # Optimum's AutoModelForVision2Seq, renamed in transformers 5
    "zero-shot-image-classification": ("AutoModelForZeroShotImageClassification",),
    "zero-shot-object-detection": ("AutoModelForZeroShotObjectDetection",),
    "mask-generation": ("AutoModel",),
    "audio-classification": ("AutoModelForAudioClassification",),
    "audio-frame-classification": ("AutoModelForAudioFrameClassification",),
    "audio-xvector": ("AutoModelForAudioXVector",),
    "automatic-speech-recognition": ("AutoModelForSpeechSeq2Seq", "AutoModelForCTC"),
    "text-to-audio": ("AutoModelForTextToSpectrogram", "AutoModelForTextToWaveform"),
}
# Optimum's other names for the same tasks.
TASK_SYNONYMS = {
    "default": "feature-extraction", "sentence-similarity": "feature-extraction", "masked-lm": "fill-mask",
    "causal-lm": "text-generation", "seq2seq-lm": "text2text-generation", "summarization": "text2text-generation",
    "translation": "text2text-generation", "sequence-classification": "text-classification",
    "zero-shot-classification": "text-classification", "speech2seq-lm": "automatic-speech-recognition",
    "audio-ctc": "automatic-speech-recognition", "vision2seq-lm": "image-to-text",
}
TASKS = (*TASK_CLASSES, *TASK_SYNONYMS)
MODEL_CLASS = r"^[A-Za-z_][A-Za-z0-9_]*$"
# How many weight names a load error lists before "... (N in all)": the line stays readable.
LISTED_WEIGHTS = 8


class HuggingFaceSource(Strict):
    """A local Hugging Face model folder (config.json + weights); the class comes from config.json's
    architectures unless `task` or `model_class` says otherwise."""

    kind: Literal["huggingface"]
    path: str = Field(
        min_length=1,
        description="folder relative to the manifest, or pkg:<package>/<subdir> inside an installed package",
    )
    allow_pickle: bool = Field(False, description="allow .bin/.pt weights (pickle can run code)")
    trust_remote_code: bool = Field(False, description="let transformers run Python code from the folder")
    task: Literal[TASKS] | None = Field(  # type: ignore[valid-type]
        None, description="load the model for this task (Optimum's names) with its transformers auto class; default: the class config.json's architectures names",
    )
    model_class: str | None = Field(
        None, pattern=MODEL_CLASS, description="a transformers model class to load (e.g. BertForMaskedLM, AutoModelForCausalLM); overrides architectures and task",
    )

    @model_serializer(mode="wrap")
    def _leave_out_unset_choices(self, handler) -> dict[str, Any]:
        """task and model_class enter the step params only when set, so a manifest without them keeps
        its step ids (and cached steps) from before they existed."""
        data = handler(self)
        return {key: value for key, value in data.items() if key not in ("task", "model_class") or value is not None}


# Models whose learned positions start after the padding index (RoBERTa's family): of
# max_position_embeddings, pad_token_id + 1 are never a token's position.
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "xmod", "data2vec-text", "longformer", "mpnet", "esm")


def max_positions(config_file: Path) -> int | None:
    """How many tokens the model's learned absolute positions cover (config.json's n_positions or
    max_position_embeddings); None for relative or rotary positions (T5, Llama...), no hard limit."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None  # loading the model reports a broken config with its own words
    for key in ("n_positions", "max_position_embeddings"):
        if isinstance(config.get(key), int) and config.get("position_embedding_type", "absolute") == "absolute" \
                and not {"rope_theta", "rope_scaling", "rope_parameters"} & set(config) and config.get("model_type") not in ("t5", "mt5", "umt5", "longt5"):
            pad = config.get("pad_token_id")
            offset = (pad if isinstance(pad, int) else 1) + 1 if config.get("model_type") in OFFSET_POSITIONS else 0
            return config[key] - offset
    return None


class HuggingFace(TorchKind):
    kind = "huggingface"
    Source = HuggingFaceSource
    tokenizes_text: ClassVar[bool] = True
    keyword_inputs: ClassVar[bool] = True

    # ---- resolving ----------------------------------------------------------------------------

    def files(self, source: HuggingFaceSource, resolver: Resolver) -> tuple[Path, ...]:
        """Every file of the folder but documentation; pickled weights only where allowed."""
        folder = resolver.path(source.path, "source.path")
        if not (folder / "config.json").is_file():
            raise resolver.error("source.path", f"{str(folder)!r} is not a Hugging Face model folder (no config.json)")
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix not in IGNORED_IN_MODEL_FOLDER)
        safe = [p for p in files if p.suffix == ".safetensors"]
        pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
        if not safe and pickled:
            check_pickle(pickled[0], source.allow_pickle, resolver, "source.allow_pickle")
        if not safe and not pickled:
            raise resolver.error("source.path", f"{str(folder)!r} holds no weights (*.safetensors, or *.bin with allow_pickle)")
        if source.model_class is not None:
            _check_model_class_exists(source.model_class, resolver)
        if not source.allow_pickle:  # pickle files are never read then, so they do not define the model
            files = [p for p in files if p.suffix not in PICKLE_SUFFIXES]
        return tuple(files)

    def listed_folder(self, files: tuple[Path, ...]) -> Path | None:
        return files[0].parent

    def check_data(self, data: Path, files: tuple[Path, ...], resolver: Resolver, key: str) -> None:
        """Text data is tokenized with the folder's own tokenizer, which must really be there."""
        folder = files[0].parent
        if data.suffix == ".txt" and not has_tokenizer(folder):
            raise resolver.error(key, f"{data.name!r} is text, but the model folder {str(folder)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); add the tokenizer files the model was trained with, or give .npz arrays named after the inputs")

    def text_positions(self, files: tuple[Path, ...]) -> int | None:
        return max_positions(files[0].parent / "config.json")

    # ---- running ------------------------------------------------------------------------------

    def load_module(self, source: dict[str, Any], files: list[Path], root: Path):
        """The model as the class the checkpoint calls for; StepError if any of its weights would
        be newly initialised (missing from the checkpoint or of another shape)."""
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at build time
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # doit's output is one line per step
        folder = files[0].parent
        model_class = load_class(source, folder)
        options = dict(
            local_files_only=True, trust_remote_code=source.get("trust_remote_code", False),
            use_safetensors=None if source.get("allow_pickle") else True, attn_implementation="eager",
        )
        model, info = _from_pretrained(model_class, folder, options)
        missing = sorted(info["missing_keys"])
        if missing and all(_in_pooler(name) for name in missing) and _takes_pooling_switch(model):
            # A checkpoint saved without a pooler (a classifier that pools its own way): its base
            # model without a pooler, rather than one initialised at random.
            model, info = _from_pretrained(model_class, folder, options | {"add_pooling_layer": False})
            missing = sorted(info["missing_keys"])
        mismatched = sorted(str(key[0] if isinstance(key, tuple) else key) for key in info.get("mismatched_keys") or ())
        if missing or mismatched:
            raise StepError(str(folder), _initialised_at_random(type(model).__name__, missing + mismatched, folder))
        return model

    def example(self, inputs: list[dict], files: list[Path]) -> dict:
        """Seeded values from the input specs; for text inputs of a folder with a tokenizer, the
        tokenized EXAMPLE_TEXT (real token ids and a real mask). Images, audio and other arrays
        never load a tokenizer."""
        from kiln.runtime.data import example_inputs, load_tokenizer

        example = example_inputs(inputs)
        folder = files[0].parent
        if not any(spec["name"] in TEXT_INPUTS for spec in inputs) or not has_tokenizer(folder):
            return example
        encoded = load_tokenizer(folder)(EXAMPLE_TEXT, padding=True, return_tensors="np")
        for spec in inputs:
            if spec["name"] in encoded:
                example[spec["name"]] = encoded[spec["name"]].astype(spec["dtype"])
        return example


def _check_model_class_exists(name: str, resolver: Resolver) -> None:
    """source.model_class names a class transformers has (its lazy listing: no model is imported)."""
    import transformers

    if name not in transformers_names():
        raise resolver.error("source.model_class", f"{name!r} is not a class of transformers {transformers.__version__}; expected a model class such as 'BertModel', 'GPT2LMHeadModel' or 'AutoModelForCausalLM'")


@functools.cache
def transformers_names() -> frozenset[str]:
    """What transformers offers, from its lazy listing (no model is imported). Listing it takes
    ~0.27 s, and every step that loads a model asks: once per process."""
    import transformers

    return frozenset(dir(transformers))


def load_class(source: dict[str, Any], folder: Path):
    """The transformers class to load the folder with: source.model_class, else source.task's auto
    class, else config.json's architectures[0] (as transformers' pipelines and Optimum choose), else
    AutoModel."""
    import transformers

    task, name = source.get("task"), source.get("model_class")
    if name:
        model_class = _transformers_model_class(name, folder, "source.model_class")
        if task:
            _check_class_does_task(model_class, task, folder, source)
        return model_class
    if task:
        return _task_class(task, folder, source)
    architectures = _config(folder).get("architectures") or []
    if not architectures:
        return transformers.AutoModel
    if architectures[0] not in transformers_names():
        if source.get("trust_remote_code"):
            return transformers.AutoModel  # the folder's auto_map names its own code
        raise StepError(str(folder), f"config.json architectures[0] {architectures[0]!r} is not a class of transformers {transformers.__version__}; set source.model_class to one that is, or source.task")
    return _transformers_model_class(architectures[0], folder, "config.json architectures[0]")


def _config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StepError(str(folder / "config.json"), f"cannot read it: {one_line(err)}") from None


def _transformers_model_class(name: str, folder: Path, where: str):
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    found = getattr(transformers, name, None)
    if not isinstance(found, type) or not issubclass(found, (transformers.PreTrainedModel, _BaseAutoModelClass)):
        raise StepError(str(folder), f"{where} {name!r} is not a transformers model class; expected one such as 'BertModel' or 'AutoModelForCausalLM'")
    return found


def _task_class(task: str, folder: Path, source: dict[str, Any]):
    """The first of the task's auto classes that knows the folder's model type."""
    import transformers

    config = _auto_config(folder, source)
    names = TASK_CLASSES[TASK_SYNONYMS.get(task, task)]
    for name in names:
        auto = getattr(transformers, name)
        if name == "AutoModel" or type(config) in auto._model_mapping:
            return auto
    raise StepError(str(folder), f"source.task {task!r}: transformers has no class for a {config.model_type!r} model in {' or '.join(names)}; choose another task, or set source.model_class")


def _check_class_does_task(model_class, task: str, folder: Path, source: dict[str, Any]) -> None:
    """source.model_class and source.task both set: the class must be one the task loads."""
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    auto = _task_class(task, folder, source)
    if issubclass(model_class, _BaseAutoModelClass):
        if model_class is not auto:
            raise StepError(str(folder), f"source.model_class {model_class.__name__!r} does not load task {task!r}, which uses {auto.__name__}; drop one of the two")
        return
    config = _auto_config(folder, source)
    if type(config) not in auto._model_mapping:  # AutoModel for a type it does not list: nothing to compare
        return
    wanted = auto._model_mapping[type(config)]
    if not issubclass(model_class, wanted):
        raise StepError(str(folder), f"source.model_class {model_class.__name__!r} does not do task {task!r}: for this {config.model_type!r} model the task loads {wanted.__name__}; drop one of the two")


def _auto_config(folder: Path, source: dict[str, Any]):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=source.get("trust_remote_code", False))


def _from_pretrained(model_class, folder: Path, options: dict[str, Any]):
    """(model, loading info); transformers' own load report is left out (kiln checks it itself)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return model_class.from_pretrained(folder, output_loading_info=True, **options)
    except (OSError, ValueError, RuntimeError) as err:
        raise StepError(str(folder), f"transformers cannot load it as {model_class.__name__}: {one_line(err)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _in_pooler(name: str) -> bool:
    return name.startswith("pooler.") or ".pooler." in name


def _takes_pooling_switch(model) -> bool:
    import inspect

    return "add_pooling_layer" in inspect.signature(type(model).__init__).parameters


def _initialised_at_random(class_name: str, names: list[str], folder: Path) -> str:
    listed = ", ".join(names[:LISTED_WEIGHTS]) + (f", ... ({len(names)} in all)" if len(names) > LISTED_WEIGHTS else "")
    architectures = _config(folder).get("architectures")
    saved_as = f" (config.json says it was saved as {', '.join(architectures)})" if architectures else ""
    return (f"{class_name} needs weights the checkpoint does not have, which would be initialised at random: {listed}; "
            f"load the class the checkpoint was saved as{saved_as} with source.model_class or source.task")
