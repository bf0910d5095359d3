"""A loaded teacher: text in, one pooled float32 vector per text out.

Loads with `transformers` from a local folder, a Hugging Face id (cached, or downloaded unless HF_HUB_OFFLINE=1)
or a GGUF file. De-quantising a GGUF file takes tens of seconds, so the converted model is saved once as
safetensors under the cache folder and later loads (every Ray actor, every run) read that instead.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from cube_ray.config import ConfigError
from cube_ray.teachers.pooling import pool
from cube_ray.teachers.registry import TeacherError, TeacherSpec, cache_dir

log = logging.getLogger(__name__)
NO_LIMIT = 10 ** 9  # a tokenizer without a known limit says int(1e30)


def _from_pretrained(cls, spec: TeacherSpec, source, **kwargs):
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return cls.from_pretrained(source, revision=spec.revision, **kwargs)
    except OSError as e:
        how = (f"download it once with `hf download {source}` (gated models need `hf auth login` first), "
               f"or set `source:` to a local folder in a YAML file passed with --teacher-config")
        state = "HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache" if offline else f"it could not be loaded ({e})"
        raise TeacherError(f"teacher {spec.name!r}: model {str(source)!r} is not available: {state}; {how}") from None


def _load_gguf(spec: TeacherSpec, folder: Path, dtype: torch.dtype):
    from transformers import AutoModel, AutoTokenizer

    gguf = folder / spec.gguf_file
    if not gguf.exists():
        raise TeacherError(f"teacher {spec.name!r}: GGUF file {gguf} does not exist")
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{spec.torch_dtype}".encode()).hexdigest()[:12]
    converted = cache_dir() / "teachers" / f"{gguf.stem}-{key}"  # shared by specs that differ only after loading
    if (converted / "config.json").exists():
        return AutoTokenizer.from_pretrained(converted), AutoModel.from_pretrained(converted, dtype=dtype)
    log.info("teacher %s: de-quantising %s (once; cached in %s)", spec.name, gguf.name, converted)
    with _parse_gguf_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
        model = AutoModel.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=dtype)
    tmp = converted.with_name(f".tmp-{converted.name}-{os.getpid()}")
    try:
        tokenizer.save_pretrained(tmp)
        # The weights are plain tensors now; transformers only refuses to save because it remembers the GGUF origin.
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tmp.replace(converted) if not converted.exists() else shutil.rmtree(tmp)
    except OSError as e:  # a read-only or full cache only costs speed next time
        log.warning("teacher %s: could not cache the converted model: %s", spec.name, e)
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer, model


@contextlib.contextmanager
def _parse_gguf_once():
    """transformers parses a GGUF file three times to convert it (tokenizer, config, weights), ~10 s each for SmolLM2's
    49k-token vocabulary, and builds gguf's tensor-name table once per module of the model (395 times, ~8 s). During
    one conversion each is made once, with the same result (SmolLM2's cold load here: 47 s -> 23 s). transformers
    imports both names from `gguf` when it calls them, so they are swapped on that module and put back after."""
    import gguf

    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(gguf.GGUFReader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


def check_max_length(spec: TeacherSpec, config, tokenizer) -> None:
    """A ConfigError unless the model has positions for `max_length` tokens (else the first long text crashes it)."""
    limit = getattr(config, "max_position_embeddings", None)  # a GGUF file's context length lands here too
    what = "max_position_embeddings"
    if limit is None and getattr(tokenizer, "model_max_length", NO_LIMIT) < NO_LIMIT:
        limit, what = tokenizer.model_max_length, "the tokenizer's model_max_length"
    if limit is not None and spec.max_length > limit:
        raise ConfigError(f"teacher {spec.name!r}: max_length {spec.max_length} is above the model's limit of {limit} "
                          f"tokens ({what}); set `max_length:` to at most {limit}")


def teacher_device(spec: TeacherSpec) -> torch.device:
    """Where `spec`'s model runs: the GPU Ray gave this process (CUDA_VISIBLE_DEVICES holds only its own, so it is
    cuda:0) when the spec asks for GPUs, else the CPU. A GPU spec where torch sees none is refused before loading."""
    if not spec.on_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise TeacherError(f"teacher {spec.name!r} runs on a GPU (gpus: {spec.gpus:g}), but torch {torch.__version__} "
                           f"sees none here (CUDA_VISIBLE_DEVICES={visible!r}, torch.cuda.is_available() is False"
                           f"{'' if torch.version.cuda else ': a CPU build of torch'}); install a CUDA build of torch "
                           f"on the GPU nodes, or set gpus: 0 (--gpus-per-actor 0) to embed on CPU")
    return torch.device("cuda", 0)


class Teacher:
    """`Teacher(spec).embed(texts)` -> (len(texts), width) float32 array."""

    def __init__(self, spec: TeacherSpec, threads: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.device = teacher_device(spec)
        dtype = getattr(torch, spec.torch_dtype)
        source = spec.resolve()
        if spec.gguf_file:
            self.tokenizer, self.model = _load_gguf(spec, Path(source), dtype)
            self.model.to(self.device)
        else:
            self.tokenizer = _from_pretrained(AutoTokenizer, spec, source)
            # device_map: the weights load straight onto the GPU (an 8B model never passes through host memory whole)
            self.model = _from_pretrained(AutoModel, spec, source, dtype=dtype,
                                          **({"device_map": {"": self.device}} if self.device.type == "cuda" else {}))
        self.model.eval()
        check_max_length(spec, self.model.config, self.tokenizer)
        if spec.int8:  # weights int8, activations quantised on the fly: faster Linear layers on CPU
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        if self.tokenizer.pad_token is None:  # decoders ship without one; the mask makes its value irrelevant
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.width = int(self.model.config.hidden_size)
        if spec.width is not None and spec.width != self.width:
            raise TeacherError(f"teacher {spec.name!r}: spec says width {spec.width}, but the model's hidden size is {self.width}")

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                 max_length=self.spec.max_length, return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            vec = pool(hidden.float(), mask, self.spec.pooling)
            if self.spec.normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
            out.append(vec.cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, self.width), np.float32)
