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
        # Hugging Face GPT-2 and Llama export/import (tools/convert_hf.py); protobuf lets
        # transformers read an exported SentencePiece tokenizer.model.
        "hf": ["transformers", "safetensors", "protobuf"],
        # Triton kernels on CUDA (the CPU paths never need it).
        "gpu": ["triton"],
        # Corpora as Parquet, zstd JSONL or save_to_disk datasets (tools/preprocess_data.py).
        "data": ["pyarrow", "zstandard"],
        # Weights & Biases logging (logging.wandb_project).
        "wandb": ["wandb"],
        # The lm-evaluation-harness model megatron-gpt (megatron-lm-eval).
        "eval": ["lm_eval>=0.4"],
        # The tests also run lm_eval's own hf model (accelerate) and write datasets.
        "test": ["pytest", "transformers", "safetensors", "protobuf", "triton",
                 "pyarrow", "zstandard", "datasets", "wandb", "lm_eval", "accelerate"],
    },
    entry_points={
        # lm_eval has no plugin entry point for models: this runs its CLI with megatron-gpt registered.
        "console_scripts": ["megatron-lm-eval=megatron.inference.lm_eval_model:main"],
    },
)
