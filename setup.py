"""Packaging for megatron-seed.

CPU machines must pin ``torch==2.13.0`` before installing this package (see the
README and Makefile): an unpinned torch would pull a CUDA build of several GB.
"""
from setuptools import find_packages, setup

setup(
    name="megatron-seed",
    version="0.1.0",
    description="Megatron-style 3D-parallel MoE training with the Seed1.5-Thinking RL recipe",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_seed*", "moe*", "rl*", "data*"]),
    package_data={"data": ["corpus/*.txt", "corpus/*.model"], "megatron_seed": ["../configs/*.yaml", "plan/gpus.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "safetensors",
        "tqdm",
        "math-verify",
        "tensorboard",  # metrics of every run (imported lazily)
        "matplotlib",  # PNG plots at the end of an RL run (imported lazily)
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "transformers", "tokenizers", "megatron-core"],  # megatron-core: interop tests (CPU torch kept)
        "gpu": ["triton", "transformer-engine[pytorch]"],
        "megatron": ["megatron-core"],
    },
    entry_points={"console_scripts": ["megatron-seed=megatron_seed.cli:main"]},
)
