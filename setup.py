from setuptools import find_packages, setup

setup(
    name="megatron-gpt",
    version="0.1.0",
    description="GPT pretraining with tensor, pipeline and data parallelism, in the Megatron-LM tradition",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron", "megatron.*"]),
    py_modules=["pretrain_gpt"],
    # The hardware profiles the planner and the log's MFU read (megatron/planning/).
    package_data={"megatron.planning": ["hardware.yaml"]},
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
        # checkpoint checksums (megatron/checkpoint/checksum.py): XXH3, several GB/s
        "xxhash>=3.0",
    ],
    extras_require={
        # Hugging Face GPT-2 export/import (tools/convert_hf.py).
        "hf": ["transformers", "safetensors"],
        # Triton kernels on CUDA (the CPU paths never need it).
        "gpu": ["triton"],
        "test": ["pytest", "transformers", "safetensors", "triton"],
    },
)
