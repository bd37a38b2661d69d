"""Everything about checkpoint files.

    files.py       names and paths, the one atomic writer, the one loader, CheckpointError
    checksum.py    the files' checksum (xxh3_64), computed while writing and reading
    integrity.py   each iteration's manifest.json (size and checksum per file), verification
    fallback.py    resuming from the newest checkpoint every rank can read
    rank_state.py  the dict one rank file holds (one builder, the model/model{i} key rule),
                   RNG states
    save_load.py   training: per-rank save with atomic renames, exact resume
    reshard.py     merge any TP / PP layout into one full state and split it again
                   (model and optimizer state, the partition rules)
    convert.py     offline re-sharding (tools/checkpoint_convert.py), writing rank files
    hf_convert.py  Hugging Face export / import (tools/convert_hf.py): picks the family
    hf_gpt2.py     the GPT-2 mapping (GPT2LMHeadModel)
    hf_llama.py    the Llama mapping (LlamaForCausalLM)
    hf_files.py    what they share: reading and atomically writing a model directory, the
                   tokenizer files both ways
"""
from megatron.checkpoint.convert import build_rank_files, convert_checkpoint, write_checkpoint
from megatron.checkpoint.files import (LATEST, MODEL_FILE, CheckpointError, atomic_write,
                                       existing_iteration_dir, iteration_dir, list_checkpoints,
                                       load_file, rank_dir_name, read_latest_iteration,
                                       shard_files)
from megatron.checkpoint.integrity import MANIFEST, read_manifest, verify_iteration
from megatron.checkpoint.hf_convert import export_to_hf, import_from_hf
from megatron.checkpoint.rank_state import (CHECKPOINT_VERSION, build_rank_state, get_rng_state,
                                            model_keys, set_rng_state)
from megatron.checkpoint.reshard import (OUTPUT_LAYER_KEY, WORD_EMBEDDINGS_KEY, CheckpointShards,
                                         merge_model_state, split_tensor)
from megatron.checkpoint.save_load import load_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_latest_iteration",
           "list_checkpoints", "existing_iteration_dir", "iteration_dir", "rank_dir_name",
           "shard_files", "LATEST", "MODEL_FILE", "CHECKPOINT_VERSION", "atomic_write",
           "load_file", "get_rng_state", "set_rng_state", "build_rank_state", "model_keys",
           "WORD_EMBEDDINGS_KEY", "OUTPUT_LAYER_KEY", "CheckpointShards", "merge_model_state", "split_tensor",
           "convert_checkpoint", "build_rank_files", "write_checkpoint", "export_to_hf",
           "import_from_hf", "MANIFEST", "read_manifest", "verify_iteration"]
