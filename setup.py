from setuptools import find_packages, setup

setup(
    name="megatron-gpt",
    version="0.1.0",
    description="GPT pretraining with tensor, pipeline and data parallelism, in the Megatron-LM tradition",
    packages=find_packages(include=["megatron", "megatron.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.3",
        "numpy",
        "pyyaml",
        "tensorboard",
        "sentencepiece",
        "tiktoken",
        "tokenizers",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "transformers", "safetensors"]},
)
