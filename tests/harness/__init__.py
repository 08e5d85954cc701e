"""Helpers the tests share, imported as `tests.harness.<name>`: `dist` (spawn gloo ranks), `train`
(the trainer on gloo ranks, the launcher, configs, logs), `ckpt` (training runs that record what
they saw, for the checkpoint tools), `fault` (launches to interrupt, the ENOSPC shim), `hf`
(Hugging Face models built from their config classes), `gemm_check` (the kernels' reference),
`import_graph` (a tree's imports, read with ast), `tiny_hf_tokenizer`, `host_sync` (the
host-sync census over a backward).
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The corpora beside the checkout (../shared/data); tests that read them skip where it is absent.
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def load_script(path: str):
    """A script of the repository (`tools/evaluate.py`, `launch/pretrain.py`) as a module: the user
    commands are scripts, not a package, so tests load them by path."""
    import importlib.util

    name = os.path.splitext(path)[0].replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(name: str):
    """tools/<name>.py as a module."""
    return load_script(f"tools/{name}.py")
