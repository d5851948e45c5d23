"""What every checkpoint converter shares: reading state-dict files and writing a vqgen workdir.

Reading (:func:`load_state_dict`): a PyTorch file through ``torch.load(map_location="cpu",
weights_only=True)`` (no arbitrary unpickling; torch is imported only here and only for such a
file) or a ``.safetensors`` file, parsed directly (8-byte header length, JSON header, raw
little-endian data), so safetensors needs no extra package. Training checkpoints that wrap the
weights (``{"state_dict": ...}``, ``{"trainer": {"var_wo_ddp": ...}}``) are unwrapped by the
caller's list of key paths; DDP's ``module.`` prefix and the ``_orig_mod.`` (``torch.compile``),
``_fsdp_wrapped_module.`` and ``_checkpoint_wrapped_module.`` segments (a full state dict saved
from FSDP with activation checkpointing) are removed wherever they occur; FSDP's flattened
``_flat_param`` shards are refused (they lose the parameter shapes). A caller may allow a few
inert classes that training scripts pickle beside the weights (``argparse.Namespace``) with
``safe_globals``; anything else that ``weights_only=True`` refuses is refused in one sentence,
and so is a truncated file. A caller that reads training checkpoints of a framework that pickles
its own objects beside the weights (Lightning's callbacks and hyper-parameters) may ask for
``opaque_objects``: every class the file names is then rebuilt as an inert :class:`OpaqueObject`
(no code named by the file runs), and only the state dict, which must hold tensors alone, is
used. Tensors come back as NumPy arrays (floating point as float32).

Writing (:func:`write_workdir`): ``config.json`` and, for each converted model, a checkpoint of
its phase exactly as training writes one: the phase is built from the config
(:func:`vqgen.train.tokenizer.build` / :func:`vqgen.train.generator.build`), its state initialised
on the config's mesh, ``params`` and ``ema_params`` replaced by the converted weights, and the
state saved as step 0 with the phase's checkpointer and fingerprint. So ``vqgen.load_tokenizer``,
``vqgen.load_generator`` and ``--mode=sample`` read the workdir as if vqgen had trained it, and
``--mode=train_tokenizer`` / ``train_generator`` on it fine-tune from the converted weights (fresh
optimiser moments and data order).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


class ConversionError(ValueError):
    """A file that is not what the converter was asked to convert (one sentence: what it is, what to do)."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file as NumPy arrays (bfloat16 and float16 become float32)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConversionError(f"{path} is too short to be a safetensors file; pass a .safetensors or .pth file.")
        (size,) = np.frombuffer(head, "<u8")
        try:
            header = json.loads(f.read(int(size)))
        except (ValueError, MemoryError) as e:
            raise ConversionError(f"{path} has no valid safetensors header ({e}); pass a .safetensors or .pth file.")
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"{path}: tensor {name} has dtype {info['dtype']}, which vqgen does not read; "
                                  "save the weights as float32, float16 or bfloat16.")
        begin, end = info["data_offsets"]
        array = np.frombuffer(data[begin:end], np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<"))
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[name] = array.reshape(info["shape"])
    return out


class OpaqueObject:
    """Stands in for an object of a class that a checkpoint names beside its weights: built from
    nothing the file says (its arguments and state are dropped), so reading it runs no code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def __setstate__(self, state: Any) -> None:
        del state


def _torch_load(path: str, safe_globals: Sequence[type] = (), opaque_objects: bool = False) -> Any:
    import pickle

    import torch  # only a PyTorch file needs torch

    try:
        allowed = list(safe_globals)
        if opaque_objects:  # the file's pickle is read, not run, to list the classes it names
            allowed += [(OpaqueObject, name) for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # an object weights_only=True does not rebuild
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"a pickled {found.group(1)} object" if found else "pickled objects other than tensors"
        raise ConversionError(
            f"{path} cannot be read with torch.load(weights_only=True): it holds {what}, and vqgen never "
            "unpickles arbitrary objects; pass a file that holds only tensors (save model.state_dict()) or a "
            ".safetensors file.") from e
    except Exception as e:  # RuntimeError (zip reader), EOFError, KeyError: a truncated or foreign file
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path} cannot be read with torch.load(weights_only=True), it is truncated or not a PyTorch file "
            f"({first[:120]}); download it again or pass the weights file itself.") from e


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        return value.numpy()
    array = np.asarray(value)
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        hasattr(v, "shape") and not isinstance(v, Mapping) for v in obj.values())


def load_state_dict(path: str, wrappers: Sequence[tuple[str, ...]] = (("state_dict",), ("model",)), *,
                    safe_globals: Sequence[type] = (), opaque_objects: bool = False) -> dict[str, np.ndarray]:
    """The state dict in ``path`` (``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors``) as NumPy arrays.

    ``wrappers`` are key paths tried in order when the file holds a dict of dicts (a training
    checkpoint): the first that leads to a dict of tensors is taken. ``safe_globals`` are classes
    that ``torch.load(weights_only=True)`` may rebuild besides tensors (inert containers such as
    ``argparse.Namespace``); with ``opaque_objects`` every other class the file names becomes an
    :class:`OpaqueObject`. Raises ``FileNotFoundError`` for a missing file and
    :class:`ConversionError` for a file that holds no state dict.
    """
    return read_state_dict(path, wrappers, safe_globals=safe_globals, opaque_objects=opaque_objects)[0]


def read_state_dict(path: str, wrappers: Sequence[tuple[str, ...]] = (("state_dict",), ("model",)), *,
                    safe_globals: Sequence[type] = (), opaque_objects: bool = False
                    ) -> tuple[dict[str, np.ndarray], str]:
    """:func:`load_state_dict` and where in the file the state dict was found (``"model"``,
    ``"trainer/var_wo_ddp"``, or ``""`` for a file that is the state dict itself)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; pass the path of a .pth or .safetensors weights file.")
    obj = read_safetensors(path) if path.endswith(".safetensors") else _torch_load(path, safe_globals, opaque_objects)
    where = ""
    if not _is_tensor_dict(obj):
        found = None
        for keys in wrappers:
            node = obj
            for key in keys:
                node = node.get(key) if isinstance(node, Mapping) else None
            if _is_tensor_dict(node):
                found, where = node, "/".join(keys)
                break
        if found is None:
            top = sorted(map(str, obj))[:6] if isinstance(obj, Mapping) else type(obj).__name__
            paths = ", ".join("/".join(k) for k in wrappers)
            raise ConversionError(f"{path} holds no state dict (top level: {top}; looked under {paths}); pass the "
                                  "file of model.state_dict().")
        obj = found
    flat = sorted(k for k in map(str, obj) if "flat_param" in k.split(".")[-1])
    if flat:
        raise ConversionError(f"{path} holds FSDP's flattened parameter shards ({flat[0]}), which lose the "
                              "parameter shapes; save it with FSDP's FULL_STATE_DICT (a consolidated state dict).")
    state = {}
    for key, value in obj.items():
        state[_clean_key(str(key))] = _to_numpy(value)
    return state, where


def _clean_key(key: str) -> str:
    """``key`` without DDP's leading ``module.`` and the wrapper segments of torch.compile/FSDP."""
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_SEGMENTS)


def check_keys(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], *, name: str, kind: str,
               ignore: Sequence[str] = (), what: str = "state dict") -> None:
    """Raises :class:`ConversionError` (one sentence) unless ``state`` holds exactly the ``expected``
    keys with those shapes; keys in ``ignore`` (buffers such as masks or statistics) may be present.
    ``what`` names the kind of file in the sentence ("state dict", or "checkpoint" for a Flax
    parameter tree whose keys are ``/``-joined paths)."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected) - set(ignore))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if extra:
        problems.append(f"unexpected {_some(extra)}")
    if wrong:
        shown = ", ".join(f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})" for k in wrong[:3])
        problems.append(f"wrong shapes {shown}" + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""))
    if problems:
        raise ConversionError(f"{name} is not a {kind} {what}: {'; '.join(problems)}.")


def _some(keys: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''} ({shown}{', ...' if len(keys) > limit else ''})"


def set_fields(section: Any, **values: Any) -> None:
    """Sets ``values`` on a locked ``ml_collections.ConfigDict`` section (new keys allowed): how
    every converter writes the sizes read from a file over its base config."""
    with section.unlocked():
        for key, value in values.items():
            section[key] = value


def oihw_to_hwio(weight: np.ndarray) -> np.ndarray:
    """A PyTorch conv weight ``[O, I, kh, kw]`` as a Flax kernel ``[kh, kw, I, O]``."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def linear_kernel(weight: np.ndarray) -> np.ndarray:
    """A PyTorch Linear weight ``[out, in]`` as a kernel ``[in, out]``."""
    return np.ascontiguousarray(weight.T)


def match_tree(params: Mapping, abstract: Any, what: str) -> dict:
    """``params`` (nested dict of arrays) cast to the dtypes of ``abstract`` (the model's unboxed
    abstract params); raises ``ValueError`` when the names or shapes differ."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    want = traverse_util.flatten_dict(dict(abstract), sep="/")
    missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
    wrong = sorted(k for k in set(want) & set(flat) if tuple(np.shape(flat[k])) != tuple(want[k].shape))
    if missing or extra or wrong:
        detail = "; ".join(part for part in (
            f"no value for {_some(missing)}" if missing else "", f"no parameter {_some(extra)}" if extra else "",
            ", ".join(f"{k} {np.shape(flat[k])} vs {tuple(want[k].shape)}" for k in wrong[:3])) if part)
        raise ValueError(f"the converted {what} weights do not fit the model the config builds ({detail}); "
                         "the config written does not describe this file.")
    return traverse_util.unflatten_dict({k: np.asarray(flat[k], want[k].dtype) for k in want}, sep="/")


def _has_checkpoint(directory: str) -> bool:
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def write_workdir(config, workdir: str, *, tokenizer_params: Mapping | None = None,
                  generator_params: Mapping | None = None, mesh=None) -> None:
    """Writes ``config.json`` and a step-0 checkpoint of each phase whose converted params are given.

    ``tokenizer_params`` / ``generator_params`` are nested dicts of arrays in the layout of the
    model the config builds (checked leaf by leaf). Refuses a workdir that already holds a
    checkpoint of a phase to be written, or a tokenizer the config does not describe (a generator
    may be added to a workdir that holds its tokenizer). Nothing is written before every phase is
    built and its weights checked. A phase state is a ``flax.struct`` dataclass with ``params`` and
    ``ema_params`` fields (both phases' states are).
    """
    # Imported here: the training stack is heavy and reading files does not need it.
    from vqgen import fileio, parallel
    from vqgen.checkpoint import IncompatibleCheckpointError
    from vqgen.train import common, run
    from vqgen.train import generator as generator_lib
    from vqgen.train import tokenizer as tokenizer_lib

    workdir = fileio.display(workdir)  # `--out runs/x` as typed; Orbax writes to absolute paths only
    phases = []
    if tokenizer_params is not None:
        phases.append((tokenizer_lib.build(config), tokenizer_params))
    if generator_params is not None:
        phases.append((generator_lib.build(config), generator_params))
    for phase, _ in phases:
        if _has_checkpoint(phase.ckpt_dir(workdir)):
            raise ConversionError(f"{phase.ckpt_dir(workdir)} already holds a checkpoint; pass a new --out "
                                  "(converted weights never overwrite a run).")
    # A generator added to a workdir that holds a tokenizer must fit that tokenizer, as a sampling run on
    # the workdir checks; converting needs no training data, so the training phases' checks are not run.
    try:
        run.validate(config, workdir, ("sample",) if generator_params is not None else ())
    except IncompatibleCheckpointError as e:
        detail = str(e).partition("(")[2].rpartition(")")[0] or str(e)
        raise ConversionError(f"{workdir} holds a tokenizer that the converted model's config does not describe "
                              f"({detail}); convert the tokenizer and the generator together into a new --out.") from e
    mesh = mesh or parallel.create_mesh(tuple(config.mesh_shape))
    rules = parallel.rules_from_config(config.logical_rules)
    built = []
    for phase, params in phases:
        abstract, shardings = common.abstract_state(phase, mesh, rules)
        built.append((phase, match_tree(params, abstract.params, phase.name), shardings))
    run.write_config(config, workdir)
    for phase, tree, shardings in built:
        state = _converted_state(phase, tree, shardings, mesh, rules)
        ckpt = phase.checkpointer(workdir)
        try:
            ckpt.save(0, state, force=True)
        finally:
            ckpt.close()


def _converted_state(phase, params: Mapping, shardings: Any, mesh, rules) -> Any:
    """The phase's initial state (its own ``init`` with its ``init_seed``, as training starts) with
    ``params`` and ``ema_params`` set to the converted weights. The initial values of those two
    fields are dropped from the compiled init, so the model's random initialisation is never run;
    on CPU the one-off init program is compiled without XLA's expensive optimisations (a second
    instead of several; the other fields' initial values agree to float rounding)."""
    from vqgen import parallel

    def init_rest(rng):
        return parallel.unbox(phase.init(rng)).replace(params=None, ema_params=None)

    rng = jax.random.key(phase.init_seed)
    cpu = mesh.devices.flat[0].platform == "cpu"
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True} if cpu else None
    with parallel.mesh_context(mesh, rules):
        init = jax.jit(init_rest, out_shardings=shardings.replace(params=None, ema_params=None))
        rest = init.lower(rng).compile(options)(rng)
        placed = jax.device_put(dict(params), shardings.params)
    return rest.replace(params=placed, ema_params=placed)
