"""common/safetensors.py: every dtype round-trips, files are byte-identical to the reference library's
in both directions, Hugging Face folders load in all four layouts, every broken file is a clear error
naming it, and a failed save leaves the previous file as it was."""

import json
import struct

import pytest
import torch
from conftest import reference

from common import safetensors
from common.safetensors import load_file, load_folder, read_config, save_file, save_folder


def every_dtype():
    """One tensor of each supported dtype, plus the shapes that are easy to get wrong: 0-d, empty, and
    a non-contiguous view (written as its contiguous copy)."""
    g = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, generator=g)
    return {
        "f64": torch.randn(2, 3, generator=g, dtype=torch.float64), "f32": floats,
        "f16": floats.half(), "bf16": floats.bfloat16(), "i64": torch.arange(-3, 3).view(2, 3),
        "i32": torch.arange(6, dtype=torch.int32), "i16": torch.tensor([-32768, 32767], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8), "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "scalar_bool": torch.tensor(False),
        "empty": torch.empty(0, 4), "empty_i64": torch.empty(3, 0, dtype=torch.int64),
        "transposed": torch.randn(5, 3, generator=g).t(), "unicode name é": torch.ones(1),
    }


def test_every_dtype_round_trips_into_writable_tensors_that_own_their_memory(tmp_path):
    tensors = every_dtype()
    save_file(tensors, tmp_path / "all.safetensors", metadata={"format": "pt"})
    loaded = load_file(tmp_path / "all.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
        assert loaded[name]._base is None and loaded[name].untyped_storage().nbytes() == tensor.nbytes, name
    loaded["f32"].add_(1.0)                                             # writable
    loaded["f32"].resize_(100)                                          # a storage of its own, resizable


def test_files_are_byte_identical_to_the_reference_library_in_both_directions(tmp_path):
    reference("safetensors")
    st = reference("safetensors.torch")
    tensors = every_dtype()
    tensors["transposed"] = tensors["transposed"].contiguous()         # the reference refuses views
    for metadata in (None, {"format": "pt"}):
        save_file(tensors, tmp_path / "ours.safetensors", metadata=metadata)
        st.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata=metadata)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    for ours_read, theirs_read in ((load_file(tmp_path / "theirs.safetensors"), tensors),
                                   (st.load_file(str(tmp_path / "ours.safetensors")), tensors)):
        assert ours_read.keys() == theirs_read.keys()
        for name in tensors:
            assert torch.equal(ours_read[name], theirs_read[name]) and ours_read[name].dtype == tensors[name].dtype


def write_two_shards(folder, tensors, save):
    """A sharded checkpoint as transformers lays it out: two shard files and an index naming, for every
    tensor, the shard that holds it."""
    names = sorted(tensors)
    shards = {"model-00001-of-00002": names[: len(names) // 2], "model-00002-of-00002": names[len(names) // 2:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save({name: tensors[name] for name in shard_names}, folder / shard)
        weight_map.update(dict.fromkeys(shard_names, shard))
    return weight_map


@pytest.mark.parametrize("layout", ["model.safetensors", "sharded safetensors", "pytorch_model.bin", "sharded bin"])
def test_load_folder_reads_all_four_layouts(tmp_path, layout):
    tensors = {f"layer.{i}.weight": torch.full((2, 2), float(i)) for i in range(5)}
    if layout == "model.safetensors":
        save_file(tensors, tmp_path / layout)
    elif layout == "pytorch_model.bin":
        torch.save(tensors, tmp_path / layout)
    else:
        bin_format = layout == "sharded bin"
        weight_map = write_two_shards(tmp_path, tensors, torch.save if bin_format else save_file)
        index_name = "pytorch_model.bin.index.json" if bin_format else "model.safetensors.index.json"
        (tmp_path / index_name).write_text(json.dumps({"metadata": {"total_size": 100}, "weight_map": weight_map}))
    loaded = load_folder(tmp_path)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)


def test_load_folder_and_read_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="has no model.safetensors or pytorch_model.bin"):
        load_folder(tmp_path)
    with pytest.raises(ValueError, match="config.json not found"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a config object"):
        read_config(tmp_path)

    tensors = {"a": torch.zeros(1), "b": torch.ones(1)}
    weight_map = write_two_shards(tmp_path, tensors, save_file)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {**weight_map, "c": "model-00003-of-00003"}}))
    with pytest.raises(ValueError, match="names the shard model-00003-of-00003"):
        load_folder(tmp_path)
    index.write_text(json.dumps({"weight_map": {**weight_map, "c": "model-00001-of-00002"}}))
    with pytest.raises(ValueError, match=r"lists 1 tensors that no shard holds: \['c'\]"):
        load_folder(tmp_path)
    index.write_text("{}")
    with pytest.raises(ValueError, match="is not a shard index"):
        load_folder(tmp_path)
    index.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="pytorch_model.bin is not a readable PyTorch checkpoint"):
        load_folder(tmp_path)


def with_header(header, data=b""):
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


F32_PAIR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("content,message", [
    (b"\x01\x02\x03", "3 bytes, too short for a header"),
    (struct.pack("<Q", 1000) + b"{}", "header length 1000 runs past the end of the file"),
    (with_header(b"\xff not json"), "corrupt safetensors header, not JSON"),
    (with_header([1, 2]), "a JSON list instead of an object"),
    (with_header({"__metadata__": {"step": 3}}), "__metadata__ must map strings to strings"),
    (with_header({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)), "tensor 'w' needs a dtype, a shape and two"),
    (with_header({"w": {**F32_PAIR, "shape": [-2]}}, bytes(8)), "tensor 'w' needs a dtype, a shape and two"),
    (with_header({"w": {**F32_PAIR, "dtype": "F8_E4M3"}}, bytes(8)), "dtype 'F8_E4M3', which is not supported"),
    (with_header({"w": F32_PAIR}, bytes(6)), "tensor 'w' runs past the end of the file"),
    (with_header({"w": {**F32_PAIR, "shape": [3]}}, bytes(8)), r"shape \[3\] of F32 takes 12 bytes"),
])
def test_every_broken_file_is_a_value_error_naming_it(tmp_path, content, message):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        load_file(path)
    assert str(path) in str(error.value)


def test_save_file_refuses_what_it_cannot_write_faithfully(tmp_path):
    embedding = torch.randn(4, 3)
    with pytest.raises(ValueError, match="'lm_head' and 'wte' share memory"):
        save_file({"wte": embedding, "lm_head": embedding}, tmp_path / "tied.safetensors")
    with pytest.raises(ValueError, match="share memory"):                # a view that overlaps another tensor
        save_file({"whole": embedding, "row": embedding[1]}, tmp_path / "tied.safetensors")
    q, k = torch.randn(6, 2).split(3, dim=0)                             # one storage, disjoint bytes: fine
    save_file({"q": q, "k": k}, tmp_path / "qk.safetensors")
    assert torch.equal(load_file(tmp_path / "qk.safetensors")["k"], k)
    with pytest.raises(ValueError, match="dtype torch.complex64"):
        save_file({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")
    with pytest.raises(ValueError, match="metadata must map strings to strings"):
        save_file({"w": torch.zeros(1)}, tmp_path / "w.safetensors", metadata={"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qk.safetensors"]


def test_a_failed_save_leaves_the_old_file_intact_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, path)
    before = path.read_bytes()

    def disk_full(tensor):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors, "memory_of", disk_full)            # fails after the header is written
    with pytest.raises(OSError, match="No space left"):
        save_file({"w": torch.ones(3), "v": torch.ones(5)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_save_folder_writes_the_weights_and_the_config(tmp_path):
    save_folder(tmp_path / "export", {"model_type": "gpt2", "n_layer": 1}, {"w": torch.arange(3.0)})
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    assert read_config(tmp_path / "export") == {"model_type": "gpt2", "n_layer": 1}
    assert torch.equal(load_folder(tmp_path / "export")["w"], torch.arange(3.0))
