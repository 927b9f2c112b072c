"""On/off flags as the bundle CLI delivers them: ``python -m monai.bundle run ... --overwrite false`` reaches the
config as the text "false" (fire reads only Python literals such as ``False``), which Python treats as true.
Every flag the docs tell users to set must read "false" as off, and refuse what is neither."""

from __future__ import annotations

import pytest
import torch

from common.bundle import bundle_config
from common.errors import user_error
from common.io import DataError, check_bool, text_bool


def test_text_bool_reads_the_spellings_and_nothing_else():
    assert [text_bool(v) for v in (True, False, "true", "False", " FALSE ", "1", "0", "yes", "no", 1, 0)] == [
        True, False, True, False, False, True, False, True, False, True, False]
    assert text_bool("maybe") is None and text_bool("") is None
    with pytest.raises(DataError, match=r"--overwrite: must be true or false, got 'maybe'"):
        check_bool("overwrite", "maybe")


def test_cgan_inference_flags_read_false_as_off():
    def evaluator(**flags):
        parser = bundle_config("brats_mri_cgan_imputation", ["inference.json", "demo.json"], **flags)
        return {"output": parser.get_parsed_content("evaluator#output")}

    off = evaluator(in_place="false", overwrite="false", skip_existing="false", progress="false")
    assert off["output"] is not None  # not in place: the output folder
    on = evaluator(in_place="true")
    assert on["output"] is None
    from common.cgan_imputation.bundle import ImputationRun

    run = ImputationRun(torch.nn.Identity(), "", ["t2w"], "t2f", overwrite="false", skip_existing="False",
                        progress="0")
    assert (run.overwrite, run.skip_existing, run.progress) == (False, False, False)
    assert ImputationRun(torch.nn.Identity(), "", ["t2w"], "t2f", overwrite="true").overwrite is True
    with pytest.raises(Exception) as info:  # MONAI wraps an expression's error; the hook prints the DataError
        evaluator(in_place="perhaps")
    assert str(user_error(info.value)) == "--in_place: must be true or false, got 'perhaps'"
    # load_target "false": the inference chain does not ask for the target contrast
    chain = bundle_config("brats_mri_cgan_imputation", ["inference.json"], load_target="false")
    with_target = bundle_config("brats_mri_cgan_imputation", ["inference.json"], load_target="true")
    assert str(chain.get_parsed_content("prepare_transforms")) != str(with_target.get_parsed_content(
        "prepare_transforms"))


def test_network_and_sampler_flags_read_false_as_off():
    from common.networks import build_autoencoder, build_unet
    from common.samplers import make_scheduler
    from common.vqgan_transformer.transforms import GradeLabeld

    def unet(flag):
        return build_unet(1, 1, base_channels=8, channel_mult=(1, 1), attention_levels=(False, False),
                          num_res_blocks=1, num_head_channels=8, norm_num_groups=4, gradient_checkpointing=flag)

    # checkpoint_blocks replaces the blocks' forward: only "true" wraps them
    assert "forward" not in vars(unet("false").middle_block) and "forward" in vars(unet("true").middle_block)
    ae = build_autoencoder(1, 1, channels=(8, 8), num_res_blocks=1, norm_num_groups=4, use_checkpoint="false")
    assert ae.use_checkpoint is False
    assert make_scheduler("ddim", clip_sample="false").clip_sample is False
    assert make_scheduler("ddim", clip_sample="true").clip_sample is True
    assert GradeLabeld(required="false").required is False
    with pytest.raises(DataError, match="--clip_sample"):
        make_scheduler("ddim", clip_sample="sometimes")
    with pytest.raises(DataError, match="--ae_gradient_checkpointing"):  # the id a user sets, not the argument
        build_autoencoder(1, 1, channels=(8, 8), num_res_blocks=1, norm_num_groups=4, use_checkpoint="maybe")


def test_attention_levels_read_false_as_off_as_fire_delivers_them():
    """fire reads ``--unet_attention_levels [false,true]`` as ['false', 'true']: both texts are true to Python, which
    silently put attention at every level (16x slower tiny training at 16^3, where level 0 has 4096 tokens)."""
    from fire.parser import DefaultParseValue

    from common.networks import build_unet

    def unet(levels):
        return build_unet(1, 1, base_channels=8, channel_mult=(1, 1), attention_levels=levels, num_res_blocks=1,
                          num_head_channels=8, norm_num_groups=4)

    delivered = DefaultParseValue("[false,true]")
    assert delivered == ["false", "true"]
    for levels in (delivered, "[false, true]", (False, True), ["0", "1"]):
        net = unet(levels)
        assert not hasattr(net.down_blocks[0], "attentions") and hasattr(net.down_blocks[1], "attentions"), levels
    assert not hasattr(unet(["false", "false"]).down_blocks[1], "attentions")
    for bad in (["false", "maybe"], "false", 1):
        with pytest.raises(DataError, match="--unet_attention_levels: must be a list of true/false values"):
            unet(bad)

