"""The doors of the house plan (docs/architecture.md), checked on the source.

Only ``megatron/mpu`` talks to ``torch.distributed``; ``mpu`` imports nothing
else of ``megatron``; ``megatron`` never imports ``tools``, ``bench`` or
``tests``; the model never imports the loop, checkpoints, data or tools; data
and tokenizers never import the model or mpu's layers; tools and benches never
edit ``sys.path``, and every entry point runs through ``megatron.cli``. Each
failure names the file and line.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "megatron")


def _sources():
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
                yield rel, ast.parse(open(path, encoding="utf-8").read(), filename=rel)


def _imports(tree):
    """(line, imported module name) of every import statement, nested ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def distributed_uses(tree):
    """(line, text) of every import of torch.distributed and every ``torch.distributed.*``."""
    hits = []
    for line, module in _imports(tree):
        if module == "torch.distributed" or module.startswith("torch.distributed."):
            hits.append((line, f"import {module}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name and (name == "torch.distributed" or name.startswith("torch.distributed.")):
                hits.append((node.lineno, name))
    by_line = {}
    for line, text in hits:  # one entry per line: the longest name on it
        if len(text) > len(by_line.get(line, "")):
            by_line[line] = text
    return sorted(by_line.items())


def _violations(rule):
    found = []
    for rel, tree in _sources():
        for line, text in rule(rel, tree):
            found.append(f"{rel}:{line}: {text}")
    return found


def test_torch_distributed_only_in_mpu():
    def rule(rel, tree):
        if rel.startswith("megatron/mpu/"):
            return []
        return distributed_uses(tree)
    bad = _violations(rule)
    assert not bad, ("torch.distributed used outside megatron/mpu (use the helpers of "
                     "megatron.mpu.collectives):\n" + "\n".join(bad))


def test_scan_finds_a_distributed_call():
    # The scan itself must see the forms used in practice.
    tree = ast.parse("import torch\nimport torch.distributed as dist\n"
                     "def f(t):\n    torch.distributed.all_reduce(t)\n")
    assert [line for line, _ in distributed_uses(tree)] == [2, 4]


def _forbidden_imports(prefixes_of, forbidden):
    def rule(rel, tree):
        if not any(rel.startswith(p) for p in prefixes_of):
            return []
        return [(line, f"imports {mod}") for line, mod in _imports(tree)
                if any(mod == f or mod.startswith(f + ".") for f in forbidden)]
    return rule


def test_mpu_imports_only_torch():
    def rule(rel, tree):
        if not rel.startswith("megatron/mpu/"):
            return []
        return [(line, f"imports {mod}") for line, mod in _imports(tree)
                if (mod == "megatron" or mod.startswith("megatron."))
                and not mod.startswith("megatron.mpu")]
    bad = _violations(rule)
    assert not bad, "megatron/mpu imports the rest of megatron:\n" + "\n".join(bad)


def test_megatron_never_imports_its_callers():
    bad = _violations(_forbidden_imports(["megatron/"], ["tools", "bench", "tests"]))
    assert not bad, "megatron imports tools/bench/tests:\n" + "\n".join(bad)


def test_model_never_imports_the_loop_checkpoints_or_data():
    forbidden = ["megatron.training", "megatron.checkpoint", "megatron.checkpointing",
                 "megatron.data", "tools"]
    bad = _violations(_forbidden_imports(["megatron/model/"], forbidden))
    assert not bad, "megatron/model imports a room it must not:\n" + "\n".join(bad)


def test_data_and_tokenizer_never_import_the_model_or_layers():
    forbidden = ["megatron.model", "megatron.mpu.layers", "megatron.mpu.mappings"]
    bad = _violations(_forbidden_imports(["megatron/data/", "megatron/tokenizer/"], forbidden))
    assert not bad, "megatron/data or tokenizer imports the model:\n" + "\n".join(bad)


def _scripts(*folders):
    """(relative path, text) of every .py file directly in ``folders``."""
    for folder in folders:
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                rel = f"{folder}/{name}"
                yield rel, open(os.path.join(ROOT, rel), encoding="utf-8").read()


def test_tools_and_benches_import_the_installed_package():
    # `pip install -e .` makes megatron importable; a script that edits sys.path could
    # import another checkout's code than the one installed.
    bad = [f"{rel}:{n}: {line.strip()}" for rel, text in _scripts("tools", "bench")
           for n, line in enumerate(text.splitlines(), 1) if "sys.path.insert" in line]
    assert not bad, "sys.path edited in tools/ or bench/:\n" + "\n".join(bad)


def test_every_entry_point_runs_through_the_cli_runner():
    # pretrain_gpt.py and each tool: `main` decorated with megatron.cli.command, so a user
    # error is one line, exit 1, and the process group is torn down.
    bad = []
    entry = os.path.join(ROOT, "pretrain_gpt.py")
    for rel, text in [*_scripts("tools"), ("pretrain_gpt.py", open(entry, encoding="utf-8").read())]:
        tree = ast.parse(text, filename=rel)
        imports_command = any(isinstance(n, ast.ImportFrom) and n.module == "megatron.cli"
                              and any(a.name == "command" for a in n.names) for n in tree.body)
        main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
        decorated = main is not None and any(
            _dotted(d.func if isinstance(d, ast.Call) else d) == "command" for d in main.decorator_list)
        if not (imports_command and decorated):
            bad.append(rel)
    assert not bad, "main() not decorated with megatron.cli.command in: " + ", ".join(bad)
