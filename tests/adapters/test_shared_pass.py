"""shared_frozen_blocks: the UNet's down and mid blocks run once for two ControlNet branches, bit-identically."""
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from condistill.adapters.shared_pass import same_inputs, shared_frozen_blocks


def _tiny_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=16,
    ).requires_grad_(False)
    return unet


def _controlnet(unet, seed):
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16), conditioning_channels=1)
    for p in cn.parameters():  # leave the zero init behind so the residuals matter
        p.data.add_(0.05 * torch.randn_like(p))
    return cn


def _branch(unet, cn, z, t, emb, cond):
    down, mid = cn(z, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
    return unet(z, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]


def _step(unet, online, ema, share: bool):
    g = torch.Generator().manual_seed(1)
    z, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    cond, t = torch.rand(2, 1, 16, 16, generator=g), torch.tensor([10, 700])
    blocks = list(unet.down_blocks) + [unet.mid_block] if share else []
    with shared_frozen_blocks(blocks) as stats:
        with torch.no_grad():
            ode = _branch(unet, ema, z.clone(), t, emb, cond)  # an equal copy, not the same tensor
            target = _branch(unet, ema, z * 0.5, t - 5, emb, cond)
        pred = _branch(unet, online, z, t, emb, cond)
        loss = ((pred - ode) ** 2).mean() + ((pred - target) ** 2).mean()
        loss.backward()
    grads = torch.cat([p.grad.flatten() for p in online.parameters() if p.grad is not None])
    return loss.detach(), grads, stats


def test_sharing_is_bit_identical_and_skips_the_repeated_down_pass():
    unet = _tiny_unet()
    online, ema = _controlnet(unet, 1), _controlnet(unet, 2)
    loss_plain, grads_plain, stats_plain = _step(unet, online, ema, share=False)
    online.zero_grad(set_to_none=True)
    loss_shared, grads_shared, stats = _step(unet, online, ema, share=True)
    assert torch.equal(loss_plain, loss_shared)
    assert torch.equal(grads_plain, grads_shared)
    # 3 shared blocks (2 down + mid): the ODE and target branches run them, the online branch reuses the ODE's
    assert (stats.runs, stats.hits) == (6, 3)
    assert (stats_plain.runs, stats_plain.hits) == (0, 0)
    assert "forward" not in vars(unet.down_blocks[0])  # the blocks are restored on exit


def test_trainable_blocks_are_refused():
    unet = _tiny_unet()
    unet.mid_block.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable parameters"):
        with shared_frozen_blocks([unet.mid_block]):
            pass
    assert "forward" not in vars(unet.mid_block)


def test_inputs_that_require_grad_always_run():
    unet = _tiny_unet()
    x = torch.randn(1, 64, 4, 4, requires_grad=True)
    temb = torch.randn(1, 128)
    with shared_frozen_blocks([unet.mid_block]) as stats:
        a = unet.mid_block(x, temb, encoder_hidden_states=torch.zeros(1, 5, 16))
        b = unet.mid_block(x, temb, encoder_hidden_states=torch.zeros(1, 5, 16))
    assert stats.hits == 0 and stats.runs == 2 and a.requires_grad and b.requires_grad


def test_same_inputs_compares_structure_and_values():
    t = torch.arange(4.0)
    assert same_inputs((t, {"k": [1, None]}), (t.clone(), {"k": [1, None]}))
    assert not same_inputs((t,), (t + 1,))
    assert not same_inputs((t,), (t.double(),))
    assert not same_inputs((t,), (t[:3],))
    assert not same_inputs({"k": 1}, {"j": 1})
    assert not same_inputs([t], (t,))
    assert not same_inputs(1, 1.5)
