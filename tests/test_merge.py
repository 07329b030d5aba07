"""embtune.merge on its own, without training: a LoRA adapter with random (nonzero) B saved as training saves
one, merged and compared with peft's merge_and_unload; slerp tensor by tensor against numpy's formula at an
asymmetric t. Seconds, so that `make mutate MODULE=merge` runs them per mutant."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from embtune.encode import encode
from embtune.merge import merge_adapter, slerp, slerp_models
from embtune.models import load_embedder

TEXTS = ["how to sort a list", "sorted returns a new sorted list from the items in iterable", "open a file"]


@pytest.fixture(scope="module")
def adapter(tiny_embedding, tmp_path_factory):
    """The tiny model with peft LoRA (r=4, alpha 12: scale 3) whose B is drawn at random, saved by
    sentence-transformers as notebook 03 saves its adapter."""
    from embtune.lora import LoraOptions, load_embedder_for_training, plan

    options = LoraOptions(full_finetune=False, quant="none", lora_r=4, lora_alpha=12)
    model = load_embedder_for_training(str(tiny_embedding), options, plan(options, str(tiny_embedding),
                                                                           capability=None), 64)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save(str(folder))
    return folder


def test_the_merge_equals_peft_merge_and_unload(adapter, tiny_embedding, tmp_path):
    """peft's own merge is the independent reference; a float32 base gives float32 weights back."""
    from peft import PeftModel
    from safetensors.torch import load_file as load_torch
    from transformers import AutoModel

    assert json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"] == 12
    expected = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_embedding), adapter).merge_and_unload()
    out = merge_adapter(str(tiny_embedding), adapter, tmp_path / "merged")
    merged = load_torch(out / "model.safetensors")
    assert merged.keys() == expected.state_dict().keys()
    moved = 0
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(merged[name], value, atol=1e-6, rtol=1e-5)
        assert merged[name].dtype == torch.float32
        moved += "proj" in name
    base = load_torch(Path(tiny_embedding) / "model.safetensors")
    assert sum(not torch.equal(base[n], merged[n]) for n in base) == moved == 2 * 7  # every projection, no other
    model = load_embedder(str(out), device="cpu")  # a whole model: the adapter's modules and prompts, no peft
    assert model.prompts == load_embedder(str(tiny_embedding), device="cpu").prompts
    assert encode(model, TEXTS).shape == (3, 64)
    half = merge_adapter(str(tiny_embedding), adapter, tmp_path / "half", dtype=torch.bfloat16)
    assert {v.dtype for v in load_torch(half / "model.safetensors").values()} == {torch.bfloat16}


def test_an_adapter_other_than_plain_lora_or_for_another_model_is_refused(adapter, tiny_embedding, minilm_path,
                                                                          tmp_path):  # fmt: skip
    dora = shutil.copytree(adapter, tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"only plain LoRA adapters merge here \(this one uses \['use_dora'\]\)"):
        merge_adapter(str(tiny_embedding), dora, tmp_path / "out")
    with pytest.raises(ValueError, match="match no weight of"):
        merge_adapter(minilm_path, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_rslora_scales_by_the_square_root_of_the_rank(adapter, tiny_embedding, tmp_path):
    from safetensors.torch import load_file as load_torch

    rs = shutil.copytree(adapter, tmp_path / "rs")
    config = json.loads((rs / "adapter_config.json").read_text())
    (rs / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    plain, scaled = (load_torch(merge_adapter(str(tiny_embedding), a, tmp_path / a.name / "m") / "model.safetensors")
                     for a in (adapter, rs))  # fmt: skip
    base = load_torch(Path(tiny_embedding) / "model.safetensors")
    name = "layers.1.mlp.down_proj.weight"
    # alpha / r = 3 against alpha / sqrt(r) = 6: twice the update
    torch.testing.assert_close(scaled[name] - base[name], 2 * (plain[name] - base[name]), atol=1e-6, rtol=1e-4)


def numpy_slerp(x: np.ndarray, y: np.ndarray, t: float) -> np.ndarray:
    """Shoemake's formula with the norm interpolated linearly, written again in float64."""
    x, y = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    omega = math.acos(np.clip(x @ y / (nx * ny), -1, 1))
    if omega < 1e-4:
        return (1 - t) * x + t * y
    unit = (math.sin((1 - t) * omega) * x / nx + math.sin(t * omega) * y / ny) / math.sin(omega)
    return ((1 - t) * nx + t * ny) * unit


def test_slerp_at_an_asymmetric_t_follows_the_formula():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    quarter = 1.25 * torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)])  # a quarter of angle and norm
    assert torch.allclose(slerp(a, b, 0.25), quarter, atol=1e-6)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 70_000, generator=generator), torch.randn(3, 70_000, generator=generator)  # 3 slices
    np.testing.assert_allclose(slerp(x, y, 0.3).numpy().ravel(), numpy_slerp(x.numpy(), y.numpy(), 0.3),
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    half = slerp(x.bfloat16(), y.bfloat16(), 0.3)
    assert half.dtype == torch.bfloat16 and half.shape == (3, 70_000)
    parallel = slerp(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0]), 0.25)  # no angle: a straight line
    assert torch.allclose(parallel, torch.tensor([1.5, 1.5]))
    opposite = slerp(torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 0.0]), 0.25)
    assert torch.allclose(opposite, torch.tensor([0.0, 0.0]))
    steps = torch.tensor([3, 4])  # integer tensors (position ids) are taken whole from the nearer model
    assert slerp(steps, steps + 1, 0.4) is steps and torch.equal(slerp(steps, steps + 1, 0.6), steps + 1)


def test_slerp_models_interpolates_each_tensor_and_keeps_the_second_model_s_folder(adapter, tiny_embedding,
                                                                                    tmp_path):  # fmt: skip
    tuned = merge_adapter(str(tiny_embedding), adapter, tmp_path / "tuned")
    (tuned / "marker.txt").write_text("the fine-tuned model's own file")
    out = slerp_models(tiny_embedding, tuned, 0.25, tmp_path / "quarter")
    base, b, mixed = (load_file(Path(f) / "model.safetensors") for f in (tiny_embedding, tuned, out))
    assert mixed.keys() == base.keys()
    curved = 0
    for name, x in base.items():
        expected = numpy_slerp(x, b[name], 0.25)
        np.testing.assert_allclose(mixed[name].ravel(), expected, rtol=1e-4, atol=1e-6, err_msg=name)
        curved += not np.allclose(expected, 0.75 * x.ravel() + 0.25 * b[name].ravel(), atol=1e-7)
    assert curved == 2 * 7  # the moved projections follow the arc, not the chord
    assert (out / "marker.txt").read_text() == "the fine-tuned model's own file"
    with pytest.raises(ValueError, match="not the architecture of"):
        slerp_models(out / "1_Pooling", tuned, 0.5, tmp_path / "bad")  # a folder without the model's weights
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("unsupported", [{"use_dora": True}, {"fan_in_fan_out": True}, {"rank_pattern": {"q": 8}},
                                         {"alpha_pattern": {"q": 8}}, {"modules_to_save": ["score"]},
                                         {"peft_type": "IA3"}])  # fmt: skip
def test_every_adapter_other_than_plain_lora_is_refused_by_name(adapter, tiny_embedding, tmp_path, unsupported):
    other = shutil.copytree(adapter, tmp_path / "other")
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, **unsupported}))
    used = "IA3" if "peft_type" in unsupported else str(list(unsupported))
    with pytest.raises(ValueError, match=f"only plain LoRA adapters merge here \\(this one uses {re.escape(used)}\\)"):
        merge_adapter(str(tiny_embedding), other, tmp_path / "out")
    del config["peft_type"]  # an adapter_config.json without a type is LoRA's
    (other / "adapter_config.json").write_text(json.dumps(config))
    merge_adapter(str(tiny_embedding), other, tmp_path / "out")


def test_a_sharded_base_merges_into_shards_with_its_index_and_metadata(adapter, tiny_embedding, tmp_path):
    """A base saved in shards (as every model above 5 GB is): each shard merged, the index and the files'
    metadata ("format": "pt", which transformers checks) kept; the model loads whole and equals peft's merge."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModel

    base = tmp_path / "sharded"
    shutil.copytree(tiny_embedding, base)
    for f in base.glob("model*.safetensors"):
        f.unlink()
    AutoModel.from_pretrained(tiny_embedding).save_pretrained(base, max_shard_size="100KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 2 and (base / "model.safetensors.index.json").exists()
    out = merge_adapter(str(base), adapter, tmp_path / "merged")
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_text() == (base / "model.safetensors.index.json").read_text()
    for shard in shards:
        with safe_open(out / shard, "pt") as merged, safe_open(base / shard, "pt") as original:
            assert merged.metadata() == original.metadata() == {"format": "pt"}
    expected = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_embedding), adapter).merge_and_unload()
    got = AutoModel.from_pretrained(out).state_dict()
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5)


def test_our_safetensors_reader_and_writer_agree_with_the_safetensors_library(tmp_path):
    """The format by its own library, both ways: empty, integer, 16-bit and boolean tensors, metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from embtune.merge import SafetensorsFile, write_safetensors

    tensors = {"empty": torch.zeros(0, 3), "ids": torch.arange(5), "half": torch.randn(2, 3).bfloat16(),
               "mask": torch.tensor([True, False]), "odd": torch.randn(7).half()}  # fmt: skip
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    theirs = SafetensorsFile(tmp_path / "theirs.safetensors")
    assert theirs.meta == {"format": "pt"} and set(theirs.keys()) == set(tensors)
    for name, value in tensors.items():
        assert torch.equal(theirs.tensor(name), value) and theirs.tensor(name).dtype == value.dtype, name
    specs = [(n, tuple(v.shape), v.dtype) for n, v in tensors.items()]
    write_safetensors(tmp_path / "ours.safetensors", specs, tensors.__getitem__, {"format": "pt", "note": "x"})
    read = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(read[n], v) and read[n].dtype == v.dtype for n, v in tensors.items())
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    raw = (tmp_path / "ours.safetensors").read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0  # the data starts 8-byte aligned
    with pytest.raises(ValueError, match=r"^ids: shape \(5,\), expected \(6,\)$"):
        write_safetensors(tmp_path / "bad.safetensors", [("ids", (6,), torch.int64)], tensors.__getitem__)
    assert not (tmp_path / "bad.safetensors").exists()


def test_slerp_near_the_ends_of_its_range_of_angles(monkeypatch):
    """At a wide angle (2.5 rad) the arc; within 1e-4 of antiparallel the straight line (the arc is undefined
    there); a zero tensor: the line; a tensor with itself: itself, though rounding puts its cosine above 1; in
    slices as in one piece; the result in the first tensor's dtype."""
    from embtune import merge

    a, b = torch.tensor([1.0, 0.0]), 2 * torch.tensor([math.cos(2.5), math.sin(2.5)])
    expected = 1.25 * torch.tensor([math.cos(0.25 * 2.5), math.sin(0.25 * 2.5)])
    assert torch.allclose(slerp(a, b, 0.25), expected, atol=1e-6)
    almost_opposite = torch.tensor([-3.0, 1e-5])
    assert torch.allclose(slerp(a, almost_opposite, 0.25), torch.tensor([0.0, 2.5e-6]), atol=1e-9)
    assert torch.equal(slerp(torch.zeros(2), b, 0.25), 0.25 * b)
    x = torch.full((1000,), 0.3)
    assert float(x @ x) / float(x.square().sum()) > 1  # float32 rounding: the case the clamp is for
    assert torch.allclose(slerp(x, x, 0.3), x)
    assert slerp(a, b.half(), 1.0).dtype == torch.float32
    generator = torch.Generator().manual_seed(2)
    y, z = torch.randn(10_000, generator=generator), torch.randn(10_000, generator=generator)
    whole = slerp(y, z, 0.3)
    monkeypatch.setattr(merge, "SLICE", 4096)  # three slices, the last one short
    torch.testing.assert_close(slerp(y, z, 0.3), whole)
