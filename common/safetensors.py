"""safetensors, the file format of Hugging Face checkpoints, read and written with the standard library.

A file has three parts (https://github.com/huggingface/safetensors):

    N        8 bytes, an unsigned little-endian integer: the length of the header
    header   N bytes of UTF-8 JSON, padded with spaces to a multiple of 8 bytes (so the data is aligned):
                 {"__metadata__": {"format": "pt"},                          optional, str -> str
                  "wte.weight": {"dtype": "F32", "shape": [50257, 768], "data_offsets": [0, 154389504]},
                  ...}
    data     each tensor's raw little-endian bytes in row-major order; data_offsets [begin, end) count
             from the end of the header, and end - begin = prod(shape) * itemsize

Unlike a pickled `pytorch_model.bin`, nothing in the file is code, and any one tensor can be read
without the others: `load_file` reads tensor by tensor, straight into each tensor's own memory, so a
6 GB checkpoint costs 6 GB of RAM, not 12.

    save_file({"w": torch.ones(2, 2)}, "w.safetensors")
    load_file("w.safetensors")        # {'w': tensor([[1., 1.], [1., 1.]])}

`save_file` writes what the `safetensors` package writes, byte for byte (the tests check it; two or more
metadata entries the package orders at random), so neither side needs that package. For Hugging Face
checkpoint folders: `load_folder` (the state dict, in any of its four layouts), `read_config`
(config.json) and `save_folder` (what every `save_pretrained` here writes).
"""

import ctypes
import json
import math
import os
import struct
from pathlib import Path

import torch

from common.checkpoint import atomic_path, atomic_write_json

# The dtype names of the header. Their order is the reference library's (its `Dtype` enum): it writes
# the tensors sorted by that order, last first, then by name, and `save_file` does the same.
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
          "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def memory_of(tensor):
    """A ctypes buffer over the bytes of a contiguous CPU tensor (no copy): `file.readinto` fills it,
    `file.write` sends it. Torch tensors have no Python buffer interface of their own."""
    return (ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())


# ----------------------------------------------------------------------------------------- one file

def read_header(file, path):
    """The validated header of an open safetensors file: ({name: (dtype, shape, begin, end)}, where the
    data starts). Every way a file can be broken is a ValueError naming it, before any tensor is read."""
    file_size = os.fstat(file.fileno()).st_size
    if file_size < 8:
        raise ValueError(f"{path} is not a safetensors file: {file_size} bytes, too short for a header")
    (header_length,) = struct.unpack("<Q", file.read(8))
    if header_length > file_size - 8:
        raise ValueError(f"{path} is not a safetensors file (or is truncated): the header length "
                         f"{header_length} runs past the end of the file ({file_size} bytes)")
    try:
        header = json.loads(file.read(header_length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: corrupt safetensors header, not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header, a JSON {type(header).__name__} instead of an object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError(f"{path}: corrupt safetensors header, __metadata__ must map strings to strings")
    data_size = file_size - 8 - header_length
    entries = {}
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header, tensor {name!r} needs a dtype, a shape and "
                             f"two data_offsets (non-negative integers), got {info!r}"[:300]) from None
        if dtype_name not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype_name!r}, which is not supported "
                             f"(supported: {', '.join(DTYPES)})")
        dtype = DTYPES[dtype_name]
        if end > data_size:
            raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (bytes {begin}..{end} of "
                             f"{data_size}): truncated?")
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise ValueError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] ({end - begin} bytes), "
                             f"but shape {shape} of {dtype_name} takes {expected} bytes")
        entries[name] = (dtype, shape, begin, end)
    return entries, 8 + header_length


def load_file(path):
    """{name: tensor} of a .safetensors file, every tensor on the CPU, writable and owning its memory."""
    tensors = {}
    with open(path, "rb") as file:
        entries, data_start = read_header(file, path)
        for name, (dtype, shape, begin, end) in entries.items():
            tensor = torch.empty(shape, dtype=dtype)                          # contiguous, its own memory
            if end > begin:
                file.seek(data_start + begin)
                if file.readinto(memory_of(tensor)) != end - begin:           # the file shrank under us
                    raise ValueError(f"{path}: tensor {name!r} is cut short: truncated file?")
            tensors[name] = tensor
    return tensors


def shared_memory(tensors):
    """Names of two tensors whose memory overlaps (tied weights, views of one another), or None.

    The reference library refuses to save these: written twice, a tied pair would load as two independent
    copies. transformers drops the tied copy before saving and ties it again on load; do the same."""
    spans = []                                                                # (device, first byte, end, name)
    for name, tensor in tensors.items():
        if tensor.numel():
            extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
            start = tensor.data_ptr()
            spans.append((str(tensor.device), start, start + extent * tensor.element_size(), name))
    spans.sort()
    for (device, _, end, name), (next_device, next_start, _, next_name) in zip(spans, spans[1:]):
        if device == next_device and next_start < end:
            return name, next_name
    return None


def save_file(tensors, path, metadata=None):
    """Write {name: tensor} to a .safetensors file, atomically: the old file stays intact until the new
    one is complete. The tensors are written from contiguous CPU copies, sorted as the reference library
    sorts them (widest dtype first, then by name); `metadata` is an optional {str: str}.

    Tensors that share memory are a ValueError, as in the reference library: save the tied copy once.
    """
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"{path}: tensor names must be strings other than '__metadata__', got {name!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ValueError(f"{path}: {name!r} is not a dense tensor ({type(tensor).__name__})")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors files here "
                             f"do not support (supported: {', '.join(map(str, DTYPE_NAMES))})")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: metadata must map strings to strings, got {metadata!r}"[:300])
    shared = shared_memory(tensors)
    if shared:
        raise ValueError(f"{path}: tensors {shared[0]!r} and {shared[1]!r} share memory (tied weights?); "
                         "save one of them only")
    rank = {dtype: i for i, dtype in enumerate(DTYPES.values())}
    names = sorted(tensors, key=lambda name: (-rank[tensors[name].dtype], name))
    header = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name in names:
        tensor = tensors[name]
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)                                     # align the data to 8 bytes
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name in names:                                                    # one CPU copy at a time
            tensor = tensors[name].detach().to("cpu").contiguous()
            if tensor.nbytes:
                file.write(memory_of(tensor))


# ----------------------------------------------------------------------------------------- a folder

def read_config(folder):
    """config.json of a Hugging Face checkpoint folder, as a dict; missing or not JSON -> ValueError."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file} not found: not a Hugging Face checkpoint folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} holds a JSON {type(config).__name__}, not a config object")
    return config


def load_torch_file(path):
    """A pytorch_model.bin, unpickled with weights_only=True: tensors and plain values, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:                              # pickle errors, truncated zips, foreign objects
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({first_line[:200]})") from None


def load_folder(folder):
    """The state dict of a Hugging Face checkpoint folder, from the first of

        model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin, pytorch_model.bin.index.json

    that it holds. An index is {"weight_map": {tensor name: shard file}}; every shard is read once."""
    folder = Path(folder)
    for single, reader in (("model.safetensors", load_file), ("pytorch_model.bin", load_torch_file)):
        if (folder / single).is_file():
            return dict(reader(folder / single))
        index_file = folder / f"{single}.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{index_file} is not a shard index (JSON with a weight_map)") from None
            state = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise ValueError(f"{index_file} names the shard {shard}, which is not in {folder}")
                state.update(reader(folder / shard))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise ValueError(f"{index_file} lists {len(missing)} tensors that no shard holds: {missing[:3]}")
            return state
    raise ValueError(f"{folder} has no model.safetensors or pytorch_model.bin (nor a sharded index of either)")


def save_folder(folder, config, tensors):
    """Write a Hugging Face checkpoint folder: `tensors` as model.safetensors (with the {"format": "pt"}
    metadata transformers writes), then `config` as config.json, each file atomically. config.json comes
    last, so a folder that has one has its weights."""
    folder = Path(folder)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", config)
