"""The training plan: backend, quantisation, mixed precision and gradient checkpointing, decided before loading."""

import pytest
import torch

from embtune.lora import LoraOptions, plan, precision, quantization_kwargs, unsloth_kwargs


def test_mixed_precision_follows_the_compute_capability():
    """bf16 from Ampere (sm 8.0), which has it in hardware; fp16 with a gradient scaler on a T4 (sm 7.5); fp32 on
    the CPU (NVIDIA's CUDA compute-capability tables)."""
    assert precision((7, 5)) == "fp16"
    assert [precision(c) for c in ((8, 0), (8, 9), (9, 0))] == ["bf16"] * 3
    assert precision(None) == "fp32"
    t4 = plan(LoraOptions(), "unused", n_params=600_000_000, capability=(7, 5))
    assert t4.trainer_args() == {"bf16": False, "fp16": True} and "mixed precision fp16" in str(t4)
    h100 = plan(LoraOptions(), "unused", n_params=600_000_000, capability=(9, 0))
    assert h100.trainer_args() == {"bf16": True, "fp16": False}
    cpu = plan(LoraOptions(), "unused", n_params=600_000_000, capability=None)
    assert cpu.trainer_args() == {"bf16": False, "fp16": False}
    bnb = quantization_kwargs(t4)["quantization_config"]  # 4-bit on the T4 computes in fp16, not in bf16
    assert bnb.load_in_4bit and bnb.bnb_4bit_compute_dtype == torch.float16


def test_full_fine_tuning_keeps_fp32_weights_and_asks_for_checkpointing():
    """AdamW updates round away in 16-bit weights, so full fine-tuning loads fp32 master weights (the Trainer's
    autocast computes in bf16/fp16); unsloth reads gradient checkpointing at load time only."""
    full = plan(LoraOptions(full_finetune=True, gradient_checkpointing=True), "unused", n_params=10**8,
                capability=(8, 0))  # fmt: skip
    kwargs = unsloth_kwargs(full, 512)
    assert kwargs["dtype"] == torch.float32 and not kwargs["load_in_16bit"] and kwargs["full_finetuning"]
    assert kwargs["use_gradient_checkpointing"] == "unsloth"
    assert quantization_kwargs(full) == {"dtype": torch.float32}  # the peft path too: transformers would load a
    # bf16 checkpoint (Qwen3's) in bf16
    lora = plan(LoraOptions(quant="none"), "unused", n_params=10**9, capability=(8, 0))
    assert unsloth_kwargs(lora, 512)["load_in_16bit"] and quantization_kwargs(lora) == {"dtype": torch.bfloat16}


def test_a_bf16_checkpoint_is_fully_fine_tuned_in_float32_weights(tiny_embedding, tmp_path):
    """What the plan loads, read off the loaded model: a bf16 checkpoint (as Qwen3's are) trains float32 weights
    when fully fine-tuned, and keeps its 16 bits for LoRA on a CPU, where the memory plan counts 2 bytes."""
    from sentence_transformers import SentenceTransformer

    from embtune.lora import load_embedder_for_training

    SentenceTransformer(str(tiny_embedding), device="cpu").to(torch.bfloat16).save(str(tmp_path / "bf16"))
    for full, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        options = LoraOptions(full_finetune=full, quant="none")
        how = plan(options, str(tmp_path / "bf16"), capability=None)
        model = load_embedder_for_training(str(tmp_path / "bf16"), options, how, 64)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {dtype}, full


def test_backend_choice():
    cpu = plan(LoraOptions(), "unused", n_params=10**9, capability=None)
    assert cpu.backend == "peft" and "no CUDA GPU" in cpu.why and not cpu.gradient_checkpointing
    forced = plan(LoraOptions(backend="peft"), "unused", n_params=10**9, capability=(9, 0))
    assert forced.backend == "peft" and forced.quant == "4bit" and forced.gradient_checkpointing
    with pytest.raises(ValueError, match="needs a CUDA GPU for an embedder"):
        plan(LoraOptions(backend="unsloth"), "unused", n_params=10**9, capability=None)
    with pytest.raises(ValueError, match="backend='fast' is not allowed: expected one of 'auto', 'unsloth', 'peft'"):
        LoraOptions(backend="fast")


def test_importing_embtune_on_a_cpu_machine_leaves_unsloth_alone():
    import subprocess
    import sys

    script = "import sys, embtune.train, embtune.rerank_train; print('unsloth' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("quant, full", [("none", True), ("4bit", False)])
def test_the_plan_line_says_what_the_loaded_model_does(tiny_embedding, quant, full):
    """Gradient checkpointing and the trainable weights' dtype are read off the loaded model: checkpointing asked
    for is on, and full fine-tuning trains float32 weights (as do LoRA's adapters over 4-bit ones)."""
    from embtune.train import TrainConfig, load_for_training

    config = TrainConfig(base_model=str(tiny_embedding), data_dir="d", run_dir="r", quant=quant, full_finetune=full,
                         gradient_checkpointing=True)  # fmt: skip
    model, how = load_for_training(config)
    assert model[0].auto_model.is_gradient_checkpointing and how.gradient_checkpointing
    assert how.trainable_dtype == "float32" and "(float32 weights)" in str(how)
    assert "gradient checkpointing on" in str(how)
    off, how_off = load_for_training(TrainConfig(base_model=str(tiny_embedding), data_dir="d", run_dir="r"))
    assert not off[0].auto_model.is_gradient_checkpointing and "gradient checkpointing off" in str(how_off)
