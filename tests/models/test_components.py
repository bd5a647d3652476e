"""Component slots from *outside* the core: a toy MLP kind and a toy attention operator, registered here, train,
save, reload through ``load_network``, sample and count FLOPs with no edit to ``ditlab/models``."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from ditlab.data.digits import DigitsDataModule
from ditlab.diffusion.sample import sample_images
from ditlab.methods.base import DiffusionModule
from ditlab.models.attention import Attention
from ditlab.models.budget import activated_parameter_count, flops_per_image, parameter_count
from ditlab.models.components import ATTENTION, MLP, register_attention, register_mlp
from ditlab.models.config import DiTConfig
from ditlab.models.interop import to_diffusers
from ditlab.models.loading import load_network
from ditlab.models.taps import run_blocks

# --- the components a method would bring ---------------------------------------------------------------


class GatedToyMLP(nn.Module):
    """``w_out(silu(gate(x)) * up(x))`` with an auxiliary loss on the hidden activations, and half its
    parameters 'activated' per token (to exercise the sparse-expert hook)."""

    def __init__(self, dim: int, hidden: int, weight: float) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.weight = weight
        self.aux_losses: dict[str, torch.Tensor] = {}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.silu(self.gate(tokens)) * self.up(tokens)
        if self.training:
            self.aux_losses = {"loss_toy": self.weight * hidden.pow(2).mean()}
        return self.down(hidden)

    def macs(self, num_tokens: int) -> int:
        return num_tokens * 3 * self.gate.weight.numel()

    def activated_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters()) // 2


class BandedToyOperator:
    """Each query attends to keys within ``radius`` positions in token order; its softmax map is exposed."""

    name = "toy-banded"

    def __init__(self, radius: int) -> None:
        self.radius = radius

    def map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        length = q.shape[-2]
        index = torch.arange(length, device=q.device)
        allowed = (index[:, None] - index[None, :]).abs() <= self.radius
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.map(q, k) @ v

    def macs(self, num_tokens: int, num_heads: int, head_dim: int) -> int:
        return 2 * num_tokens * (2 * self.radius + 1) * num_heads * head_dim


class MaplessToyOperator:
    """The same banded mixing behind a kernel that never forms a map (no ``map`` method)."""

    name = "toy-mapless"

    def __init__(self) -> None:
        self.banded = BandedToyOperator(1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.banded(q, k, v)

    def macs(self, num_tokens: int, num_heads: int, head_dim: int) -> int:
        return self.banded.macs(num_tokens, num_heads, head_dim)


@register_mlp("toy-gated")
def toy_gated(config: DiTConfig) -> GatedToyMLP:
    return GatedToyMLP(config.hidden_size, config.mlp_options.get("hidden", 16), config.mlp_options.get("weight", 0.1))


@register_attention("toy-banded")
def toy_banded(config: DiTConfig) -> Attention:
    return Attention.from_config(config, BandedToyOperator(config.attention_options.get("radius", 1)))


@register_attention("toy-mapless")
def toy_mapless(config: DiTConfig) -> Attention:
    return Attention.from_config(config, MaplessToyOperator())


TOY = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                mlp="toy-gated", mlp_options={"hidden": 24, "weight": 0.1},
                attention="toy-banded", attention_options={"radius": 2})  # fmt: skip


# --- the tests ---------------------------------------------------------------------------------------------


def test_registered_kinds_build_into_every_block():
    assert {"toy-gated"} <= set(MLP) and {"toy-banded", "toy-mapless"} <= set(ATTENTION)
    dit = TOY.build()
    assert all(isinstance(block.mlp, GatedToyMLP) and block.mlp.down.in_features == 24 for block in dit.blocks)
    assert all(block.attn.operator.radius == 2 for block in dit.blocks)
    with pytest.raises(ValueError, match="'toy-gated' is already registered"):
        register_mlp("toy-gated")(lambda config: None)


def test_train_save_reload_sample_and_count_flops(tmp_path):
    L.seed_everything(0)
    module = DiffusionModule(network=TOY, lr=3e-3, ema_decay=0.5)
    logged: list[dict[str, float]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    before = {name: value.clone() for name, value in module.network.state_dict().items()}
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, callbacks=[Record()])  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=32, image_size=8))

    # trained: every block component moved, the auxiliary loss is logged under its own name and is in the loss
    after = module.network.state_dict()
    assert all(not torch.equal(after[name], before[name]) for name in after if name.startswith("blocks.")
               and not name.endswith("adaLN_modulation.1.bias"))  # fmt: skip
    assert all("train/loss_toy" in row and row["train/loss_toy"] > 0 for row in logged)
    for row in logged:  # loss = diffusion MSE + learned-variance VLB + the block components' auxiliary loss
        expected = row["train/loss_diffusion"] + row["train/loss_vb"] + row["train/loss_toy"]
        assert row["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert all(block.mlp.aux_losses == {} for block in module.network.blocks)  # collected once per step

    # saved and reloaded through the one loader: same config, same weights, same outputs
    path = tmp_path / "toy.ckpt"
    trainer.save_checkpoint(path)
    reloaded = load_network(path)
    assert reloaded.config == TOY and reloaded.config.mlp_options == {"hidden": 24, "weight": 0.1}
    for name, value in module.ema.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value)
    raw = load_network(path, use_ema=False)
    assert all(torch.equal(raw.state_dict()[n], v) for n, v in module.network.state_dict().items())

    # samples: the reloaded network draws exactly what the trained EMA draws
    labels = torch.tensor([0, 3, 7])
    options = {"steps": 4, "cfg_scale": 2.0, "seed": 3}
    ours = sample_images(module.ema.eval(), module.objective, labels, **options)
    theirs = sample_images(reloaded, module.objective, labels, **options)
    assert ours.shape == (3, 1, 8, 8) and torch.isfinite(ours).all()
    assert torch.equal(ours, theirs)

    # FLOPs come from the components' own counts; parameters per token from the MLP's own hook
    tokens, dense = 16, DiTConfig(**{**TOY.to_dict(), "mlp": "dense", "mlp_options": {},
                                     "attention": "full", "attention_options": {}}).build()  # fmt: skip
    per_block_difference = (3 * 32 * 24 - 2 * 32 * 128) * tokens + 2 * tokens * (5 - tokens) * 2 * 16
    assert flops_per_image(reloaded) == flops_per_image(dense) + 2 * 2 * per_block_difference
    mlp_parameters = sum(p.numel() for p in reloaded.blocks[0].mlp.parameters())
    assert activated_parameter_count(reloaded) == parameter_count(reloaded) - 2 * (mlp_parameters - mlp_parameters // 2)


def test_attention_maps_come_through_the_operator_or_are_refused():
    dit = TOY.build().eval()
    with torch.no_grad():
        for block in dit.blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.1)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([1, 2])
    tapped = run_blocks(dit, x, t, y, attention=[1])
    weights = tapped.attention[1]
    far = (torch.arange(16)[:, None] - torch.arange(16)[None, :]).abs() > 2
    assert weights.shape == (2, 2, 16, 16) and torch.all(weights[..., far] == 0)  # the banded operator's own map
    torch.testing.assert_close(tapped.output, dit(x, t, y), atol=1e-5, rtol=0)

    mapless = DiTConfig(**{**TOY.to_dict(), "attention": "toy-mapless", "attention_options": {}}).build()
    with pytest.raises(ValueError, match="'toy-mapless' attention operator gives no attention maps"):
        run_blocks(mapless, x, t, y, attention=[0])


def test_other_tools_refuse_kinds_they_cannot_handle_by_name():
    from ditlab.methods.compress.prune import prune_depth, prune_width

    dit = TOY.build()
    with pytest.raises(ValueError, match="'toy-banded' attention and a 'toy-gated' MLP"):
        prune_width(dit, num_heads=1)
    with pytest.raises(ValueError, match="'toy-banded' attention and a 'toy-gated' MLP"):
        to_diffusers(dit)
    shallow = prune_depth(dit, [1])  # depth pruning copies whole blocks: any component kind
    assert shallow.config == TOY.replace(depth=1)
    assert all(torch.equal(shallow.blocks[0].state_dict()[k], v) for k, v in dit.blocks[1].state_dict().items())
