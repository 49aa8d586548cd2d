"""kind = "huggingface": a local Hugging Face model folder (config.json + weights), loaded with
transformers.AutoModel; its tokenizer turns text data into inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from kiln.schema.fields import Strict
from kiln.sources.base import PICKLE_SUFFIXES, Resolver, check_pickle
from kiln.sources.torch_model import TorchKind

# Files of a Hugging Face folder that do not change the model: documentation and git plumbing.
IGNORED_IN_MODEL_FOLDER = (".md", ".gitattributes", ".gitignore")
# Two sentences of different lengths, so a traced graph sees padding and a real attention mask.
EXAMPLE_TEXT = ["kiln builds model artifacts.", "An example with padding, so the mask is not all ones."]


class HuggingFaceSource(Strict):
    """A local Hugging Face model folder (config.json + weights), loaded with transformers.AutoModel."""

    kind: Literal["huggingface"]
    path: str = Field(
        min_length=1,
        description="folder relative to the manifest, or pkg:<package>/<subdir> inside an installed package",
    )
    allow_pickle: bool = Field(False, description="allow .bin/.pt weights (pickle can run code)")
    trust_remote_code: bool = Field(False, description="let transformers run Python code from the folder")


class HuggingFace(TorchKind):
    kind = "huggingface"
    Source = HuggingFaceSource
    tokenizes_text: ClassVar[bool] = True
    keyword_inputs: ClassVar[bool] = True

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
        if not source.allow_pickle:  # pickle files are never read then, so they do not define the model
            files = [p for p in files if p.suffix not in PICKLE_SUFFIXES]
        return tuple(files)

    def listed_folder(self, files: tuple[Path, ...]) -> Path | None:
        return files[0].parent

    def load_module(self, source: dict[str, Any], files: list[Path], root: Path):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at build time
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # doit's output is one line per step

        return AutoModel.from_pretrained(
            files[0].parent,
            local_files_only=True,
            trust_remote_code=source.get("trust_remote_code", False),
            use_safetensors=None if source.get("allow_pickle") else True,
            attn_implementation="eager",
        )

    def example(self, inputs: list[dict], files: list[Path]) -> dict:
        """Seeded values, with the tokenized EXAMPLE_TEXT (real token ids and a real mask) for the
        inputs the tokenizer gives."""
        from kiln.runtime.data import example_inputs, load_tokenizer

        example = example_inputs(inputs)
        encoded = load_tokenizer(files[0].parent)(EXAMPLE_TEXT, padding=True, return_tensors="np")
        for spec in inputs:
            if spec["name"] in encoded:
                example[spec["name"]] = encoded[spec["name"]].astype(spec["dtype"])
        return example
