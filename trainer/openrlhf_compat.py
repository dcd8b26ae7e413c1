"""What lets tapo's OpenRLHF modules run OpenRLHF 0.11.2 where its full stack is not installed,
and its own argument parsers: the version guard, the flash-attn stand-in, and parsing with an
OpenRLHF entry point's parser (with Ray stand-ins where Ray is absent).

    require_openrlhf()                                   # ImportError unless 0.11.2
    stub_flash_attn()                                    # before importing openrlhf.models
    args = parse_openrlhf("openrlhf.cli.train_sft", flags)
    write_args(args, path)                               # the JSON each launched process reads
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

OPENRLHF_VERSION = "0.11.2"  # the version the OpenRLHF trainer and adapter are written against


def require_openrlhf() -> None:
    """Raises ImportError unless the installed OpenRLHF is OPENRLHF_VERSION (its internals,
    which both OpenRLHF modules use, change between versions)."""
    import importlib.metadata

    found = importlib.metadata.version("openrlhf")
    if found != OPENRLHF_VERSION:
        raise ImportError(f"tapo's OpenRLHF trainer is written against openrlhf=="
                          f"{OPENRLHF_VERSION}, found {found}: pip install "
                          f"openrlhf=={OPENRLHF_VERSION}")


def stub_flash_attn() -> None:
    """Lets OpenRLHF import where flash-attn cannot be installed (a machine without CUDA): its
    models import `flash_attn.bert_padding` at module level but call it only when packing
    samples, which the shard trainer never does. A no-op where flash-attn is installed."""
    import importlib.machinery
    import importlib.util
    import types

    if importlib.util.find_spec("flash_attn") is not None:
        return

    def unavailable(*args, **kwargs):
        raise RuntimeError("flash-attn is not installed: sample packing needs it")

    for name in ("flash_attn", "flash_attn.bert_padding", "flash_attn.utils",
                 "flash_attn.utils.distributed"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__path__ = []
        sys.modules.setdefault(name, module)
    for attr in ("pad_input", "unpad_input", "index_first_axis", "rearrange"):
        setattr(sys.modules["flash_attn.bert_padding"], attr, unavailable)
    sys.modules["flash_attn.utils.distributed"].all_gather = unavailable


def parse_openrlhf(module: str, flags: list[str]):
    """`flags` parsed by the parser OpenRLHF builds in `module`'s entry point (run as __main__
    and stopped right after parsing), nested by OpenRLHF's `hierarchize`."""
    import argparse as _argparse
    import runpy

    from openrlhf.utils.config import hierarchize

    class Parsed(Exception):
        pass

    original = _argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise Parsed(original(self, flags))

    _argparse.ArgumentParser.parse_args = parse
    try:
        with _without_ray():
            runpy.run_module(module, run_name="__main__")
    except Parsed as parsed:
        return hierarchize(parsed.args[0])
    finally:
        _argparse.ArgumentParser.parse_args = original
    raise RuntimeError(f"{module} returned without parsing its arguments")


def write_args(args, path: Path) -> None:
    """OpenRLHF's parsed arguments as the JSON each launched process reads (`load_args`)."""
    path.write_text(json.dumps(args, default=vars, indent=1))


RAY_SIDE = ("ray", "ray.util", "ray.util.placement_group", "openrlhf.trainer.ray",
            "openrlhf.trainer.ray.launcher", "openrlhf.trainer.ray.ppo_actor",
            "openrlhf.trainer.ray.ppo_critic")


@contextlib.contextmanager
def _without_ray():
    """Where Ray is not installed (a GPU node with the training stack only): placeholder
    modules stand in for Ray and OpenRLHF's Ray/vLLM side while `train_ppo_ray`'s module
    imports them; its parser, all we run of it, uses none of them. A no-op where Ray is."""
    import types

    try:
        import ray.util.placement_group  # noqa: F401
    except ImportError:
        pass
    else:
        yield
        return

    def placeholder(name):
        module = types.ModuleType(name)
        module.__path__ = []
        module.__getattr__ = lambda attr: None  # any name it imports: a placeholder
        return module

    saved = {name: sys.modules.get(name) for name in RAY_SIDE}
    sys.modules.update({name: placeholder(name) for name in RAY_SIDE})
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
