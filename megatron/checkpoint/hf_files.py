"""What the Hugging Face model mappings (hf_gpt2.py, hf_llama.py) share: reading a model
directory (config.json, the weights), writing one atomically, and the tokenizer files both ways.

Local directories only (no hub access). The tokenizer kinds travel as files transformers
loads with ``AutoTokenizer``: GPT-2 BPE as vocab.json + merges.txt, a ``tokenizers``
tokenizer.json as is, a SentencePiece model as tokenizer.model (``LlamaTokenizer``); each with a
tokenizer_config.json naming our end-of-document token as its eos and adding no BOS, as our
tokenizers encode.
"""
import json
import os
import shutil

import torch

from megatron.checkpoint.files import CheckpointError, replace_dir

# Token strings a tokenizer.json may use for the beginning of a sequence (config.json's bos).
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>")


def read_hf_config(hf_dir):
    """config.json of a local model directory as a dict."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{hf_dir} has no config.json (not a Hugging Face model directory)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from None


def read_hf_weights(hf_dir):
    """The state dict of a model directory: model.safetensors, safetensors shards listed in
    model.safetensors.index.json, or pytorch_model.bin."""
    st = os.path.join(hf_dir, "model.safetensors")
    index = st + ".index.json"
    if os.path.isfile(st) or os.path.isfile(index):
        from safetensors.torch import load_file
        if os.path.isfile(st):
            return load_file(st)
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            path = os.path.join(hf_dir, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index} lists {name}, which is missing")
            state.update(load_file(path))
        return state
    pt = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise CheckpointError(f"{hf_dir} holds neither model.safetensors (or its index) nor "
                          f"pytorch_model.bin")


def hf_getter(hf, hf_dir):
    """``get(name)``: the tensor ``name`` of the state dict ``hf``, or CheckpointError naming it."""
    def get(name):
        if name not in hf:
            raise CheckpointError(f"the Hugging Face model in {hf_dir} lacks {name}")
        return hf[name]
    return get


def check_hf_state(model_class, config, state):
    """CheckpointError unless ``state`` holds exactly the parameters (names and shapes) of
    ``model_class(config)`` (built on the meta device: no memory, no init); a tied output
    layer is not among them."""
    with torch.device("meta"):
        model = model_class(config)
    want = {n: tuple(p.shape) for n, p in model.named_parameters()}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [f"{n} {tuple(state[n].shape)} != {want[n]}" for n in want
             if n in state and tuple(state[n].shape) != want[n]]
    if missing or unexpected or wrong:
        raise CheckpointError(f"export mapping mismatch for {model_class.__name__}: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}, shapes {wrong[:3]}")


def write_hf_dir(save_dir, config, state, tokenizer_cfg, eod, max_length):
    """Write config.json, model.safetensors and the tokenizer files (``write_tokenizer_files``)
    into a temporary directory beside ``save_dir``, then rename it over ``save_dir``;
    returns the tokenizer files written."""
    from safetensors.torch import save_file
    tmp = save_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        dtypes = {t.dtype for t in state.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        # transformers 5 names it dtype, 4.x torch_dtype
        setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
        config.save_pretrained(tmp)
        save_file({n: t.contiguous() for n, t in state.items()},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        written = write_tokenizer_files(tokenizer_cfg or {}, tmp, eod, max_length)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, save_dir)
    return written


def special_ids(tokenizer_cfg, tokenizer, fallback_eod):
    """(bos, eos) ids for config.json: eos is our end of document; bos the tokenizer's own
    beginning-of-sequence token where it has one (SentencePiece's, a tokenizer.json's
    <s> / <|begin_of_text|>), else the end of document as GPT-2 uses it."""
    eod = tokenizer.eod if tokenizer is not None else fallback_eod
    kind = (tokenizer_cfg or {}).get("type")
    bos = None
    if tokenizer is not None and kind == "SentencePieceTokenizer":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=tokenizer_cfg["tokenizer_model"])
        bos = sp.bos_id() if sp.bos_id() >= 0 else None
    elif tokenizer is not None and kind == "HuggingFaceTokenizer":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tokenizer_cfg["tokenizer_model"])
        bos = next((i for i in map(tok.token_to_id, _BOS_CANDIDATES) if i is not None), None)
    return (eod if bos is None else bos), eod


def write_tokenizer_files(tok_cfg, out_dir, eod, max_length):
    """Copy the tokenizer's files next to the model with a tokenizer_config.json; returns
    the names written (none for a NullTokenizer)."""
    kind = tok_cfg.get("type")
    settings = {"model_max_length": int(max_length)}
    if kind == "GPT2BPETokenizer":
        shutil.copyfile(tok_cfg["vocab_file"], os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(tok_cfg["merge_file"], os.path.join(out_dir, "merges.txt"))
        written = ["vocab.json", "merges.txt"]
        special = "<|endoftext|>"
        settings.update(tokenizer_class="GPT2Tokenizer", bos_token=special, eos_token=special,
                        unk_token=special, add_prefix_space=False)
    elif kind == "HuggingFaceTokenizer":
        from tokenizers import Tokenizer
        shutil.copyfile(tok_cfg["tokenizer_model"], os.path.join(out_dir, "tokenizer.json"))
        written = ["tokenizer.json"]
        tok = Tokenizer.from_file(tok_cfg["tokenizer_model"])
        settings.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=tok.id_to_token(eod))
    elif kind == "SentencePieceTokenizer":
        import sentencepiece as spm
        shutil.copyfile(tok_cfg["tokenizer_model"], os.path.join(out_dir, "tokenizer.model"))
        written = ["tokenizer.model"]
        sp = spm.SentencePieceProcessor(model_file=tok_cfg["tokenizer_model"])
        piece = (lambda i: sp.id_to_piece(i) if i >= 0 else None)
        # Our SentencePieceTokenizer adds neither BOS nor EOS; say so, or LlamaTokenizer adds <s>.
        settings.update(tokenizer_class="LlamaTokenizer", bos_token=piece(sp.bos_id()),
                        eos_token=piece(eod), unk_token=piece(sp.unk_id()), add_bos_token=False,
                        add_eos_token=False, legacy=False)
    else:
        return []
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(settings, f, indent=2)
    return written + ["tokenizer_config.json"]


def import_tokenizer(hf_dir, save_dir, tok_cfg, model_vocab):
    """Copy the tokenizer files of ``hf_dir`` under ``save_dir/tokenizer`` and point the config
    section ``tok_cfg`` at them: vocab.json + merges.txt (GPT-2 BPE), else tokenizer.json,
    else tokenizer.model (SentencePiece); without any, ids only (a NullTokenizer of
    ``model_vocab`` ids whose last is the end of document)."""
    from megatron.tokenizer import build_tokenizer
    tok_dir = os.path.abspath(os.path.join(save_dir, "tokenizer"))
    kinds = [("GPT2BPETokenizer", ("vocab.json", "merges.txt")),
             ("HuggingFaceTokenizer", ("tokenizer.json",)),
             ("SentencePieceTokenizer", ("tokenizer.model",))]
    for kind, names in kinds:
        if all(os.path.isfile(os.path.join(hf_dir, n)) for n in names):
            break
    else:
        tok_cfg.type, tok_cfg.vocab_size = "NullTokenizer", model_vocab - 1
        return tok_cfg.type
    os.makedirs(tok_dir, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tok_dir, name))
    tok_cfg.type = kind
    if kind == "GPT2BPETokenizer":
        tok_cfg.vocab_file = os.path.join(tok_dir, "vocab.json")
        tok_cfg.merge_file = os.path.join(tok_dir, "merges.txt")
    else:
        tok_cfg.tokenizer_model = os.path.join(tok_dir, names[0])
    size = build_tokenizer(tok_cfg).vocab_size
    if size > model_vocab:
        raise CheckpointError(f"{hf_dir}: its tokenizer ({names[0]}) has {size} ids, more than the "
                              f"model's vocab_size {model_vocab}")
    return kind
