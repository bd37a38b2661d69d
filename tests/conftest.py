import os
import sys

# Tests import `megatron` and `tests.*` (the harness, tests/helpers/) from the checkout, installed or not.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Tools and benches run as subprocesses (`python tools/x.py`) import `megatron` as an
# installed package: lead their path with this checkout too, whichever one is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != ROOT])
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Triton reads TRITON_INTERPRET once, when it is imported, and torch imports it on the
# way (torch.utils.flop_counter, which the dry run uses): without CUDA every Triton
# kernel test needs the interpreter, so set it before any test imports anything.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
