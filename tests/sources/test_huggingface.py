"""kiln.sources.huggingface: which transformers class a folder loads as (config.json's architectures,
a task, an explicit class), that no weight is ever initialised at random, heads' outputs by name,
tokenizers only where the inputs are text (a pad token borrowed from eos, reported), and vision or
encoder-only folders built end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import hf_models
from conftest import Workspace, new_workspace
from kiln.errors import StepError
from kiln.runtime import data as runtime_data
from kiln.sources import load_torch_model
from kiln.sources.huggingface import TASK_CLASSES, TOKENIZER_FILES, HuggingFace, HuggingFaceSource

HF = HuggingFace()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One tiny folder per architecture, made once for the module (each takes about a second)."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "bert": hf_models.bert(root / "bert"),
        "classifier": hf_models.bert(root / "classifier", "BertForSequenceClassification"),
        "masked_lm": hf_models.bert(root / "masked_lm", "BertForMaskedLM", tokenizer=False),
        "gpt2": hf_models.gpt2(root / "gpt2"),
        "t5_encoder": hf_models.t5_encoder(root / "t5_encoder"),
        "vit": hf_models.vit_classifier(root / "vit"),
    }


def load(folder: Path, **choice):
    return HF.load_module({"kind": "huggingface", "path": "m", **choice}, [folder / "config.json"], folder)


# ---- the class ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [
    ("bert", "BertModel"),  # what manifests/bert.toml's all-MiniLM-L6-v2 is saved as: unchanged
    ("classifier", "BertForSequenceClassification"),
    ("masked_lm", "BertForMaskedLM"),
    ("gpt2", "GPT2LMHeadModel"),
    ("t5_encoder", "T5EncoderModel"),
    ("vit", "ViTForImageClassification"),
])
def test_the_class_is_the_one_config_json_architectures_names(folders, name, expected):
    assert json.loads((folders[name] / "config.json").read_text())["architectures"] == [expected]
    assert type(load(folders[name])).__name__ == expected


def test_a_folder_without_architectures_loads_with_automodel(folders, tmp_path: Path):
    import shutil

    folder = shutil.copytree(folders["bert"], tmp_path / "bare")
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    assert type(load(folder)).__name__ == "BertModel"


@pytest.mark.parametrize("name,task,expected", [
    ("classifier", "feature-extraction", "BertModel"),
    ("classifier", "text-classification", "BertForSequenceClassification"),
    ("classifier", "sequence-classification", "BertForSequenceClassification"),  # Optimum's synonym
    ("gpt2", "causal-lm", "GPT2LMHeadModel"),
    ("gpt2", "feature-extraction", "GPT2Model"),
    ("vit", "feature-extraction", "ViTModel"),
])
def test_a_task_chooses_its_auto_class_over_architectures(folders, name, task, expected):
    assert type(load(folders[name], task=task)).__name__ == expected


def test_every_task_names_auto_classes_that_transformers_has():
    import transformers

    assert {name for names in TASK_CLASSES.values() for name in names} <= set(dir(transformers))


def test_model_class_overrides_architectures_and_must_agree_with_the_task(folders):
    assert type(load(folders["classifier"], model_class="BertModel")).__name__ == "BertModel"
    assert type(load(folders["classifier"], model_class="AutoModel", task="feature-extraction")).__name__ == "BertModel"
    with pytest.raises(StepError, match="source.model_class 'BertForMaskedLM' does not do task 'text-classification': .* loads BertForSequenceClassification"):
        load(folders["classifier"], model_class="BertForMaskedLM", task="text-classification")
    with pytest.raises(StepError, match="source.model_class 'BertTokenizer' is not a transformers model class"):
        load(folders["bert"], model_class="BertTokenizer")
    with pytest.raises(StepError, match="source.task 'text-generation': transformers has no class for a 't5' model"):
        load(folders["t5_encoder"], task="text-generation")


# ---- weights the checkpoint does not have ---------------------------------------------------------


def test_weights_missing_from_the_checkpoint_fail_with_their_names(folders):
    # The whole encoder-decoder from an encoder checkpoint: a random decoder.
    with pytest.raises(StepError) as caught:
        load(folders["t5_encoder"], model_class="T5Model")
    message = str(caught.value)
    assert "\n" not in message and str(folders["t5_encoder"]) in message
    assert "decoder.block.0.layer.0.SelfAttention.k.weight" in message and "(28 in all)" in message
    assert "saved as T5EncoderModel" in message
    # A head the checkpoint never trained: a random classifier.
    with pytest.raises(StepError, match=r"BertForSequenceClassification needs weights the checkpoint does not have, .*: classifier\.bias, classifier\.weight;"):
        load(folders["bert"], task="text-classification")


def test_a_checkpoint_without_a_pooler_gives_a_base_model_without_one(folders):
    # BertForMaskedLM was saved without a pooler: loaded as a base model, it must not get a random one.
    model = load(folders["masked_lm"], task="feature-extraction")
    assert type(model).__name__ == "BertModel" and model.pooler is None
    with pytest.raises(StepError, match="output 'pooler_output' is not produced by the model; it gives \\['last_hidden_state'\\]"):
        _run(folders["masked_lm"], {"task": "feature-extraction"}, "pooler_output", input_ids=np.array([[2, 5, 3]]))


# ---- outputs of heads ---------------------------------------------------------------------------------


def _run(folder: Path, choice: dict, output: str, **feed):
    import torch

    model = load_torch_model({"kind": "huggingface", "path": "m", **choice}, [folder / "config.json"], list(feed), [output], folder)
    with torch.inference_mode():
        return model(*(torch.from_numpy(v) for v in feed.values()))[0].numpy()


def test_head_outputs_are_available_by_name(folders):
    ids = np.array([[2, 5, 6, 3], [2, 7, 3, 0]])
    assert _run(folders["gpt2"], {}, "logits", input_ids=ids).shape == (2, 4, 300)  # causal LM: vocabulary logits
    assert _run(folders["classifier"], {}, "logits", input_ids=ids).shape == (2, 2)  # two labels
    pixels = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert _run(folders["vit"], {}, "logits", pixel_values=pixels).shape == (2, 3)
    assert _run(folders["t5_encoder"], {}, "last_hidden_state", input_ids=ids).shape == (2, 4, 32)


# ---- tokenizers ---------------------------------------------------------------------------------------


def test_a_tokenizer_without_pad_token_pads_with_eos_and_says_so(folders):
    facts: dict = {}
    tokenizer = runtime_data.load_tokenizer(folders["gpt2"], facts)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert facts == {"pad_token": "eos (the tokenizer had none)"}
    specs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}, {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}]
    data = folders["gpt2"].parent / "gpt2.txt"
    data.write_text("\n".join(hf_models.SENTENCES) + "\n")
    read: dict = {}
    batch = next(iter(runtime_data.batches(data, [folders["gpt2"] / "config.json"], specs, 4, 32, None, read)))
    assert batch["attention_mask"].min() == 0  # texts of several lengths, padded
    assert read == {"pad_token": "eos (the tokenizer had none)"}  # what the reference step reports
    # A tokenizer with its own pad token: nothing borrowed, nothing reported.
    read = {}
    next(iter(runtime_data.batches(data, [folders["bert"] / "config.json"], specs, 4, 32, None, read)))
    assert read == {}


def test_a_folder_without_tokenizer_files_has_no_tokenizer(folders):
    with pytest.raises(StepError, match="masked_lm: text data needs the model's tokenizer, but the folder has none of tokenizer.json"):
        runtime_data.load_tokenizer(folders["masked_lm"])
    assert runtime_data.TOKENIZER_FILES == TOKENIZER_FILES  # resolving and loading agree on what a tokenizer is


def test_the_export_example_of_images_loads_no_tokenizer(folders, monkeypatch):
    def no_tokenizer(*args, **kwargs):
        raise AssertionError("a tokenizer was loaded for image inputs")

    # The ViT folder given a tokenizer too: images still must not go through it.
    hf_models.wordpiece_tokenizer(folders["vit"].parent / "vit_with_tokenizer")
    monkeypatch.setattr(runtime_data, "load_tokenizer", no_tokenizer)
    pixels = [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 16, 16]}]
    for folder in (folders["vit"], folders["vit"].parent / "vit_with_tokenizer"):
        example = HF.example(pixels, [folder / "config.json"])
        assert example["pixel_values"].shape == (2, 3, 16, 16) and example["pixel_values"].dtype == np.float32


def test_the_export_example_of_text_is_tokenized_text(folders):
    specs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}, {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}]
    example = HF.example(specs, [folders["gpt2"] / "config.json"])  # padded with eos: no crash
    assert example["attention_mask"].shape[0] == 2 and example["attention_mask"].min() == 0 and example["input_ids"].max() > 1


# ---- the [source] table ---------------------------------------------------------------------------


def test_task_and_model_class_enter_the_step_params_only_when_set():
    plain = HuggingFaceSource.model_validate({"kind": "huggingface", "path": "m"})
    assert plain.model_dump() == {"kind": "huggingface", "path": "m", "allow_pickle": False, "trust_remote_code": False}
    chosen = HuggingFaceSource.model_validate({"kind": "huggingface", "path": "m", "task": "causal-lm", "model_class": "GPT2LMHeadModel"})
    assert chosen.model_dump()["task"] == "causal-lm" and chosen.model_dump()["model_class"] == "GPT2LMHeadModel"


def test_a_task_outside_optimums_vocabulary_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="task"):
        HuggingFaceSource.model_validate({"kind": "huggingface", "path": "m", "task": "make-tea"})


# ---- built end to end -----------------------------------------------------------------------------

MANIFEST = '''
[model]
name = "{name}"

[source]
kind = "huggingface"
path = "models/{name}"
{source}
{inputs}
[[outputs]]
name = "{output}"

[targets.onnx_fp32]
format = "onnx"
precision = "fp32"

[validation]
data = "data/{data}"
batch_size = 4
'''


def _input(name: str, dtype: str, shape: list) -> str:
    return f'[[inputs]]\nname = "{name}"\ndtype = "{dtype}"\nshape = {json.dumps(shape)}\n'


def hf_workspace(root: Path, name: str, folder: Path, inputs: str, output: str, data: str, source: str = "") -> Workspace:
    import shutil

    ws = new_workspace(root, {name: MANIFEST.format(name=name, source=source, inputs=inputs, output=output, data=data)})
    shutil.copytree(folder, ws.root / "manifests" / "models" / name)
    return ws


def test_a_vision_classifier_from_npz_builds_and_validates(folders, tmp_path: Path):
    ws = hf_workspace(tmp_path / "ws", "vit", folders["vit"], _input("pixel_values", "float32", ["batch", 3, 16, 16]), "logits", "images.npz")
    pixels = np.random.default_rng(3).standard_normal((10, 3, 16, 16)).astype(np.float32)
    np.savez(ws.root / "manifests/data/images.npz", pixel_values=pixels)
    ws.doit("build", "manifest=manifests/vit.toml")
    report = ws.report("vit")
    assert report["ok"] and [a["target"] for a in report["artifacts"]] == ["onnx_fp32"]
    assert report["artifacts"][0]["metrics"]["logits"]["min_cosine"] > 0.9999

    import onnxruntime as ort

    session = ort.InferenceSession(str(ws.root / "build/vit/onnx_fp32/model.onnx"))
    logits = session.run(["logits"], {"pixel_values": pixels[:2]})[0]
    expected = _run(folders["vit"], {}, "logits", pixel_values=pixels[:2])
    np.testing.assert_allclose(logits, expected, atol=1e-4)  # the classifier's head, not a base model's features


def test_a_t5_encoder_checkpoint_builds(folders, tmp_path: Path):
    inputs = _input("input_ids", "int64", ["batch", "sequence"]) + _input("attention_mask", "int64", ["batch", "sequence"])
    ws = hf_workspace(tmp_path / "ws", "t5enc", folders["t5_encoder"], inputs, "last_hidden_state", "ids.npz")
    rng = np.random.default_rng(4)
    np.savez(ws.root / "manifests/data/ids.npz", input_ids=rng.integers(0, 64, (8, 12)), attention_mask=np.ones((8, 12), np.int64))
    ws.doit("build", "manifest=manifests/t5enc.toml")
    assert ws.report("t5enc")["ok"]


def test_a_causal_lm_without_pad_token_builds_from_text_with_its_logits(folders, tmp_path: Path):
    inputs = _input("input_ids", "int64", ["batch", "sequence"]) + _input("attention_mask", "int64", ["batch", "sequence"])
    ws = hf_workspace(tmp_path / "ws", "gpt2", folders["gpt2"], inputs, "logits", "texts.txt")
    ws.edit('batch_size = 4', 'batch_size = 4\npadding_mask = "attention_mask"', name="gpt2")
    (ws.root / "manifests/data/texts.txt").write_text("\n".join(hf_models.SENTENCES) + "\n")
    ws.doit("build", "manifest=manifests/gpt2.toml")
    report = ws.report("gpt2")
    assert report["ok"] and report["artifacts"][0]["metrics"]["logits"]["min_cosine"] > 0.9999
    (reference,) = [s for s in report["steps"] if s["rule"] == "reference_outputs"]
    assert reference["info"]["pad_token"] == "eos (the tokenizer had none)"  # the report says the pad token was borrowed
