"""Writes the small example models of manifests/tiny_gpt2.toml, tiny_vit.toml and
tiny_stateful.toml (run from the repository root; the output folder defaults to manifests/models):

    python manifests/models/make_example_models.py [output-folder]

tiny-gpt2/           a GPT2LMHeadModel (2 layers, 32 wide, 512 tokens) + a byte-level BPE tokenizer
                     trained here on manifests/data/sentences.txt and calibration.txt, without a
                     pad token (like GPT-2's own)
tiny-vit/            a ViTForImageClassification (32x32 images, 8x8 patches, 2 layers, 5 labels)
tiny_stateful.onnx   an audio-like streaming model (Conv1d + 2-layer GRU) whose GRU state is an input
                     and an output, with the batch on axis 1 of the state, and a scalar sample rate

Weights are random with fixed seeds and nothing is downloaded: what kiln checks is that every
artifact computes the same function as its source, which random-but-fixed weights exercise as well
as trained ones. Every file is byte-for-byte reproducible with the same torch, transformers and
tokenizers versions (tests/test_more_examples.py regenerates them and compares). The validation
arrays (manifests/data/tiny_vit.npz, tiny_stateful.npz) come from the functions at the end, called
by manifests/data/make_example_data.py.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
SEED = 0

# The tokenizer's one special token, GPT-2's: it begins and ends texts and stands for unknown bytes.
# There is deliberately no pad token: kiln must pad with eos, as GPT-2 users do.
EOS = "<|endoftext|>"
GPT2_VOCAB = 512
N_POSITIONS = 128  # the longest sequence the model takes (and its tokenizer's model_max_length)

VIT_IMAGE, VIT_PATCH, VIT_LABELS = 32, 8, 5

AUDIO_SAMPLES, STATE_LAYERS, STATE_WIDTH, FEATURES = 160, 2, 16, 8
SAMPLE_RATE = 16000  # the rate the stateful model was "made for": its input gain is sample_rate / 16000


# ---- tiny-gpt2: a causal language model head and a GPT-2 style tokenizer -----------------------

def train_tokenizer():
    """Byte-level BPE trained on the example texts: every byte is in the base alphabet, so no text
    maps to unknown tokens. Training may count pairs on several threads; one thread rules out an
    order that depends on scheduling (two runs give the same bytes either way, checked)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=GPT2_VOCAB, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [line for name in ("sentences.txt", "calibration.txt") for line in (DATA / name).read_text(encoding="utf-8").splitlines()]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def write_tiny_gpt2(folder: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast(tokenizer_object=train_tokenizer(), bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                  model_max_length=N_POSITIONS)
    assert tokenizer.pad_token is None  # the point of this example
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=eos_id, eos_token_id=eos_id, architectures=["GPT2LMHeadModel"],
    )
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config).eval()  # lm_head is tied to the token embedding: stored once
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


# ---- tiny-vit: a vision transformer image classifier ---------------------------------------------

def write_tiny_vit(folder: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=VIT_IMAGE, patch_size=VIT_PATCH, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=VIT_LABELS,
        # At the default 0.02 the random model gives every image nearly the same logits (cosine 0.86
        # between two images' logits, all 16 images class 0), so an artifact that ignored its input
        # would score close to the real one. At 0.1 the image decides: cosine 0.49, classes 0-2.
        initializer_range=0.1,
        id2label={i: f"class_{i}" for i in range(VIT_LABELS)}, label2id={f"class_{i}": i for i in range(VIT_LABELS)},
        architectures=["ViTForImageClassification"],
    )
    torch.manual_seed(SEED)
    ViTForImageClassification(config).eval().save_pretrained(folder, safe_serialization=True)
    # How pixel_values are made from a picture (the .npz data follows it): kiln reads pixel_values
    # from the data file, but a user of the model or of its artifacts needs this. Written as
    # ViTImageProcessor.save_pretrained would write it; that class needs torchvision and PIL, which
    # kiln does not depend on.
    processor = {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "ViTImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 2,
        "rescale_factor": 1 / 255, "size": {"height": VIT_IMAGE, "width": VIT_IMAGE},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")


# ---- tiny_stateful.onnx: an audio-like streaming model with its state as an input ----------------

def stateful_module():
    """audio [batch, 160] (one 10 ms frame at 16 kHz), state [2, batch, 16] (the GRU's hidden state,
    batch on axis 1 as torch.nn.GRU keeps it), sample_rate [] (int64 scalar) -> features [batch, 8]
    (a per-step projection averaged over the frame's 10 steps), new_state [2, batch, 16]."""
    import torch
    from torch import nn

    class TinyStateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, STATE_WIDTH, kernel_size=16, stride=16)  # 160 samples -> 10 steps of 1 ms
            self.gru = nn.GRU(STATE_WIDTH, STATE_WIDTH, num_layers=STATE_LAYERS)
            self.project = nn.Linear(STATE_WIDTH, FEATURES, bias=False)  # on [steps, batch, 16]: a MatMul, not a Gemm

        def forward(self, audio, state, sample_rate):
            gain = sample_rate.to(audio.dtype) / SAMPLE_RATE  # a real use of the scalar input
            steps = torch.relu(self.conv((audio * gain).unsqueeze(1))).permute(2, 0, 1)  # [steps, batch, 16]
            hidden, new_state = self.gru(steps, state)
            return self.project(hidden).mean(dim=0), new_state

    torch.manual_seed(SEED)
    model = TinyStateful()
    # torch's default init leaves this model nearly constant: every sample's features within cosine
    # 0.999 of every other's, and the state forgotten within the frame. Validation could not tell a
    # wrong sample or a dropped state from the right one, so make both matter: wider weights, and
    # update gates biased to keep the state (as a trained streaming model's do). Now two samples'
    # features have mean cosine 0.20, and handing each sample another's state drops
    # the worst sample's cosine to -0.57 (measured on the validation data).
    with torch.no_grad():
        nn.init.uniform_(model.conv.weight, -1.0, 1.0)
        for name, param in model.gru.named_parameters():
            if name.startswith("weight"):
                nn.init.uniform_(param, -0.5, 0.5)
            elif name.startswith("bias_hh"):  # gate order r, z, n: z near 1 keeps the previous state
                param[STATE_WIDTH:2 * STATE_WIDTH] += 2.0
    return model.eval()


def write_tiny_stateful(path: Path) -> None:
    import torch

    audio, state, sample_rate = (torch.from_numpy(a) for a in stateful_arrays(count=2).values())
    # The TorchScript exporter (kiln's own): it writes ONNX GRU ops and honours dynamic_axes. Its
    # warnings are about the exporter's deprecation and about GRUs whose initial state is not an
    # input; here the state is an input, so a batch of any size runs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            stateful_module(), (audio, state, sample_rate), str(path), opset_version=17, dynamo=False,
            input_names=["audio", "state", "sample_rate"], output_names=["features", "new_state"],
            dynamic_axes={"audio": {0: "batch"}, "state": {1: "batch"}, "features": {0: "batch"}, "new_state": {1: "batch"}},
        )


# ---- validation arrays ---------------------------------------------------------------------------

def vit_pixel_values(count: int = 16, seed: int = 1) -> np.ndarray:
    """Smooth seeded images in [0, 1] (coarse noise upsampled plus a per-image gradient), normalized
    as tiny-vit's preprocessor_config.json says: (x - 0.5) / 0.5."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 1.0, (count, 3, VIT_IMAGE // 8, VIT_IMAGE // 8))
    images = np.kron(coarse, np.ones((1, 1, 8, 8)))
    ramp = np.linspace(0.0, 1.0, VIT_IMAGE)
    images = np.clip(images + rng.uniform(-0.3, 0.3, (count, 1, 1, 1)) * ramp[None, None, :, None], 0.0, 1.0)
    return ((images - 0.5) / 0.5).astype(np.float32)


def stateful_arrays(count: int = 16, seed: int = 2) -> dict[str, np.ndarray]:
    """audio: a few seeded tones plus noise per sample (speech-like amplitude); state: a GRU state
    as a previous frame would leave it (within tanh's range); sample_rate: one 0-d int64 array, the
    same for every sample (a scalar has no batch axis)."""
    rng = np.random.default_rng(seed)
    t = np.arange(AUDIO_SAMPLES) / SAMPLE_RATE
    freqs = rng.uniform(100.0, 4000.0, (count, 3, 1))
    amps = rng.uniform(0.05, 0.4, (count, 3, 1))
    phases = rng.uniform(0.0, 2 * np.pi, (count, 3, 1))
    audio = (amps * np.sin(2 * np.pi * freqs * t + phases)).sum(axis=1) + rng.normal(0.0, 0.01, (count, AUDIO_SAMPLES))
    state = rng.uniform(-0.5, 0.5, (STATE_LAYERS, count, STATE_WIDTH))
    return {"audio": audio.astype(np.float32), "state": state.astype(np.float32), "sample_rate": np.array(SAMPLE_RATE, dtype=np.int64)}


def main(out: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_gpt2(out / "tiny-gpt2")
    write_tiny_vit(out / "tiny-vit")
    write_tiny_stateful(out / "tiny_stateful.onnx")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
