"""ftjax: fine-tune pretrained Hugging Face transformers in JAX."""

import setuptools

setuptools.setup(
    name="ftjax",
    version="0.1.0",
    description="Fine-tuning pretrained transformers in JAX/Flax NNX, from Hugging Face checkpoints.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["ftjax", "ftjax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=4.50",
        "datasets>=3.0",
        "tensorflow-datasets>=4.9",
        "absl-py",
        "ml_collections>=1.0",
        "grain>=0.2",
        "safetensors>=0.4",
        "gguf>=0.10",  # reading llama.cpp GGUF checkpoints (ftjax.models.gguf)
        "huggingface_hub",
        "tqdm",
        "numpy",
        "scikit-learn",
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={
        # torch is pinned: a CPU wheel of exactly this version ships on the
        # project's machines; any other version downloads several GB.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "peft", "bitsandbytes"],
        "tfds": ["tensorflow-cpu"],
    },
)
