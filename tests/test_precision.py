"""`bertxml.models.precision`: one decision of the compute dtype per device, on this machine's CPU and on faked ones."""
import pytest
import torch

from bertxml.config import ConfigError
from bertxml.config_io import load_config
from bertxml.models.precision import autocast, cpu_flags, cpu_has_native_bf16, decide_precision

AVX2_EPYC = {"fpu", "sse4_2", "avx", "avx2", "fma"}                  # no native bf16
SAPPHIRE_RAPIDS = AVX2_EPYC | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
COOPER_LAKE = AVX2_EPYC | {"avx512f", "avx512_bf16"}
GRAVITON3 = {"fp", "asimd", "sve", "bf16", "i8mm"}                    # Arm: `Features`


def test_cpu_flags_parse_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n"
                   "flags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16"}           # the first processor's line
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("flags, native", [(AVX2_EPYC, False), (SAPPHIRE_RAPIDS, True), (COOPER_LAKE, True),
                                           (GRAVITON3, True), (set(), False)])
def test_auto_means_bf16_only_where_the_cpu_multiplies_it_natively(flags, native):
    precision = decide_precision("cpu", "auto", flags=flags)
    assert cpu_has_native_bf16(flags) is native
    assert precision.dtype == (torch.bfloat16 if native else torch.float32)
    assert precision.autocast_dtype == (torch.bfloat16 if native else None)
    assert precision.to_dict()["dtype"] == ("bfloat16" if native else "float32")


def test_auto_on_this_machine_follows_its_own_cpuinfo():
    precision = decide_precision("cpu")
    assert precision.bf16 == cpu_has_native_bf16(cpu_flags())
    assert precision.to_dict()["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "native bf16" in precision.reason


@pytest.mark.parametrize("setting, dtype", [("true", torch.bfloat16), (True, torch.bfloat16), ("yes", torch.bfloat16),
                                            ("false", torch.float32), (False, torch.float32), ("0", torch.float32)])
def test_true_and_false_force_the_choice_whatever_the_cpu(setting, dtype):
    for flags in (AVX2_EPYC, SAPPHIRE_RAPIDS):
        assert decide_precision("cpu", setting, flags=flags).dtype == dtype


def test_cuda_auto_follows_the_gpus_bf16_support():
    assert decide_precision("cuda", "auto", cuda_bf16=True).dtype == torch.bfloat16   # A100, H100
    assert decide_precision("cuda", "auto", cuda_bf16=False).dtype == torch.float32   # V100, T4
    assert decide_precision("cuda", "false", cuda_bf16=True).dtype == torch.float32


def test_a_bad_setting_is_a_config_error_naming_the_key():
    with pytest.raises(ValueError, match="auto, true or false"):
        decide_precision("cpu", "sometimes")
    with pytest.raises(ConfigError, match="train.bf16"):
        load_config(sets=["train.bf16=sometimes"])
    cfg = load_config(sets=["train.bf16=TRUE", "pretrain.bf16=no", "score.cpu_bf16=auto"])
    assert (cfg.train.bf16, cfg.pretrain.bf16, cfg.score.cpu_bf16) == ("true", "false", "auto")
    assert load_config().train.bf16 == "auto" and load_config().pretrain.bf16 == "auto"


def test_autocast_runs_matmuls_in_the_chosen_dtype():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with autocast("cpu", decide_precision("cpu", "true")):
        assert (x @ w).dtype == torch.bfloat16
    with autocast("cpu", decide_precision("cpu", "false")):
        assert (x @ w).dtype == torch.float32
