"""The lm-evaluation-harness model megatron-gpt against lm_eval's own ``hf`` model on the same
weights (exported with tools/convert_hf.py), offline, on tasks defined here: per-document
log-likelihoods within 1e-4, identical greedy generations, equal metrics."""
import glob
import json
import os
import sys

import pytest

from tests.helpers.bpe_checkpoint import corpus_text, make_bpe_checkpoint

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

TASKS = ["bridges_mc", "bridges_ppl", "bridges_gen"]


def _write_tasks(root):
    """Three small tasks as lm_eval YAMLs over local JSONL files."""
    verses = [v.strip() for v in corpus_text(30).replace("\n", " ").split(".") if len(v.split()) > 6]
    mc, ppl, gen = [], [], []
    for i, v in enumerate(verses[:12]):
        words = v.split()
        # Three choices: the true last words and two others; a context ending in a space
        # (lm_eval moves it into the continuation) every third document.
        question = " ".join(words[:-2]) + (" " if i % 3 == 0 else "")
        others = [" ".join(verses[(i + k) % len(verses)].split()[-2:]) for k in (3, 7)]
        choices = [others[0], " ".join(words[-2:]), others[1]] if i % 2 else [" ".join(words[-2:])] + others
        mc.append({"question": question, "choices": choices, "answer": 1 if i % 2 else 0})
        gen.append({"prompt": " ".join(words[:6]), "answer": " ".join(words[6:8])})
    # Long texts: the 48-position model scores them in several rolling windows.
    for i in range(5):
        ppl.append({"text": " ".join(verses[3 * i:3 * i + 3 + i])})
    os.makedirs(root, exist_ok=True)
    data = {}
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        data[name] = os.path.join(root, f"{name}.jsonl")
        with open(data[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    common = (f"dataset_path: json\ndataset_kwargs:\n  cache_dir: {os.path.join(root, 'hf_cache')}\n"
              f"  data_files:\n    test: {{path}}\ntest_split: test\n")
    yamls = {
        "bridges_mc": "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
                      "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
                      "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "bridges_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                       "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                       "  - metric: bits_per_byte\n",
        "bridges_gen": "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
                       "generation_kwargs:\n  until: [\".\", \";\"]\n  max_gen_toks: 6\n  do_sample: false\n"
                       "metric_list:\n  - metric: exact_match\n",
    }
    files = {"bridges_mc": data["mc"], "bridges_ppl": data["ppl"], "bridges_gen": data["gen"]}
    for task, body in yamls.items():
        with open(os.path.join(root, f"{task}.yaml"), "w") as f:
            f.write(f"task: {task}\n" + common.format(path=files[task]) + body)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron.checkpoint import export_to_hf
    root = tmp_path_factory.mktemp("lm_eval")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        ckpt = str(root / "ckpt")
        make_bpe_checkpoint(ckpt, tp=2, pp=2)  # any layout: the model merges the shards
        hf_dir = str(root / "hf")
        export_to_hf(ckpt, hf_dir, log=lambda *_: None)
        tasks = _write_tasks(str(root / "tasks"))
        from lm_eval.tasks import TaskManager
        hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32",
                                     tasks=TASKS, task_manager=TaskManager(include_path=tasks, include_defaults=False),
                                     device="cpu", batch_size=4, log_samples=True)
        yield {"root": root, "ckpt": ckpt, "tasks": tasks, "hf": hf, "mp": mp}


def _samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_megatron_gpt_equals_hf_model(setup):
    import megatron.inference.lm_eval_model  # noqa: F401  (registers megatron-gpt)
    from lm_eval.tasks import TaskManager
    ours = lm_eval.simple_evaluate(model="megatron-gpt", model_args=f"load={setup['ckpt']}", tasks=TASKS,
                                   task_manager=TaskManager(include_path=setup["tasks"], include_defaults=False), device="cpu",
                                   batch_size=3, log_samples=True)
    hf = setup["hf"]
    for task in ("bridges_mc", "bridges_ppl"):
        a, b = _samples(ours, task), _samples(hf, task)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x["arguments"] == y["arguments"]
            lls_ours = [r[0][0] if task == "bridges_mc" else r[0] for r in x["resps"]]
            lls_hf = [r[0][0] if task == "bridges_mc" else r[0] for r in y["resps"]]
            assert lls_ours == pytest.approx(lls_hf, abs=1e-4), (task, x["doc_id"])
            if task == "bridges_mc":  # the greedy flags too
                assert [r[0][1] for r in x["resps"]] == [r[0][1] for r in y["resps"]]
    gens = [s["resps"][0][0] for s in _samples(ours, "bridges_gen")]
    assert gens == [s["resps"][0][0] for s in _samples(hf, "bridges_gen")]
    assert any(g.strip() for g in gens)  # the tiny model does say something
    for task in TASKS:
        metrics = {k: v for k, v in ours["results"][task].items() if "," in k and "stderr" not in k}
        assert metrics, task
        for key, value in metrics.items():
            assert value == pytest.approx(hf["results"][task][key], rel=1e-6, abs=1e-9), (task, key)


def test_command_line_runs_lm_eval(setup, tmp_path, capsys, monkeypatch):
    import lm_eval.tasks
    from megatron.inference.lm_eval_model import main

    class LocalTasksOnly(lm_eval.tasks.TaskManager):
        """lm_eval's CLI would index its ~15k built-in tasks first (~45 s here); ours are local."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasksOnly)
    out = tmp_path / "out"
    # No --device: lm_eval's default is cuda:0, which falls back to the CPU here.
    assert main(["--model", "megatron-gpt", "--model_args", f"load={setup['ckpt']},dtype=float32",
                 "--tasks", "bridges_mc", "--include_path", setup["tasks"],
                 "--batch_size", "auto", "--output_path", str(out)]) == 0
    assert "bridges_mc" in capsys.readouterr().out  # lm_eval's results table
    (results_file,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    results = json.load(open(results_file))["results"]["bridges_mc"]
    assert results["acc,none"] == setup["hf"]["results"]["bridges_mc"]["acc,none"]


def test_bad_model_args_and_missing_package(setup, monkeypatch):
    from megatron.errors import UserError
    from megatron.inference.lm_eval_model import MegatronGPTLM
    with pytest.raises(UserError, match=r"needs load=CHECKPOINT_DIR"):
        MegatronGPTLM.create_from_arg_string("")
    with pytest.raises(UserError, match=r"unknown --model_args pretrained for megatron-gpt"):
        MegatronGPTLM.create_from_arg_string(f"load={setup['ckpt']},pretrained=gpt2")
    with pytest.raises(UserError, match=r"max_length 4096 exceeds the model's 48 positions"):
        MegatronGPTLM.create_from_arg_string(f"load={setup['ckpt']},max_length=4096")
    monkeypatch.delitem(sys.modules, "megatron.inference.lm_eval_model")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserError, match=r"megatron-gpt needs the Python package 'lm_eval'.*"
                                        r"pip install -e \.\[eval\]"):
        import megatron.inference.lm_eval_model  # noqa: F401
