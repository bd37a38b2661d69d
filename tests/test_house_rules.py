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
    forbidden = ["megatron.training", "megatron.checkpoint", "megatron.data", "tools"]
    bad = _violations(_forbidden_imports(["megatron/model/"], forbidden))
    assert not bad, "megatron/model imports a room it must not:\n" + "\n".join(bad)


def test_data_and_tokenizer_never_import_the_model_or_layers():
    forbidden = ["megatron.model", "megatron.mpu.layers", "megatron.mpu.mappings"]
    bad = _violations(_forbidden_imports(["megatron/data/", "megatron/tokenizer/"], forbidden))
    assert not bad, "megatron/data or tokenizer imports the model:\n" + "\n".join(bad)


def imports_of_test_modules(tree, package):
    """(line, module) of every import of a ``tests.test_*`` module in ``tree``, a module of
    ``package`` (relative imports resolved; ``importlib.import_module("...")`` included)."""
    hits = []

    def absolute(module, level):
        if not level:
            return module
        base = package.split(".")[:len(package.split(".")) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def is_test_module(name):  # tests.test_x..., or test_x... with tests/ on sys.path
        parts = name.split(".")
        return parts[0].startswith("test_") or (
            len(parts) >= 2 and parts[0] == "tests" and parts[1].startswith("test_"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            hits += [(node.lineno, a.name) for a in node.names if is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node.module, node.level)
            if is_test_module(module):
                hits.append((node.lineno, module))
            else:
                hits += [(node.lineno, f"{module}.{a.name}") for a in node.names
                         if is_test_module(f"{module}.{a.name}")]
        elif (isinstance(node, ast.Call) and _dotted(node.func) in ("importlib.import_module",
                                                                     "import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and is_test_module(node.args[0].value)):
            hits.append((node.lineno, node.args[0].value))
    return sorted(hits)


def test_no_test_module_imports_another():
    # Shared helpers live in tests/helpers/ (and tests/dist_harness.py): a test module that
    # imports another couples their collection, fixtures and import order.
    tests_dir = os.path.join(ROOT, "tests")
    bad = []
    for folder, _, files in os.walk(tests_dir):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
            package = os.path.dirname(rel).replace("/", ".")
            tree = ast.parse(open(path, encoding="utf-8").read(), filename=rel)
            bad += [f"{rel}:{line}: imports {module}"
                    for line, module in imports_of_test_modules(tree, package)]
    assert not bad, ("a module under tests/ imports a test module (move the shared code to "
                     "tests/helpers/):\n" + "\n".join(bad))


def test_scan_finds_test_module_imports():
    # The scan itself must see every form: absolute, from the package, relative, dynamic.
    # ({t} keeps a plain grep of tests/ for such imports quiet.)
    source = ("import os\nfrom tests.helpers.training import make_corpus\n"
              "from tests.{t}training import make_corpus\nimport tests.{t}model as m\n"
              "from tests import {t}generate, dist_harness\nfrom .{t}model import tiny_cfg\n"
              "from . import {t}gpt_dataset\nimport importlib\n"
              "importlib.import_module('tests.{t}clip_grads')\nimport {t}mpu_layers\n"
              ).format(t="test_")
    found = imports_of_test_modules(ast.parse(source), "tests")
    assert [line for line, _ in found] == [3, 4, 5, 6, 7, 9, 10], found
    assert imports_of_test_modules(ast.parse("from ..test_model import tiny_cfg\n"),
                               "tests.helpers") == [(1, "tests.test_model")]


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
