"""The released UniRestorer network (router + 30 experts + DA-CLIP), official key layout.

Upstream: mrluin/UniRestorer @ 88b933cd (``basicsr/models/archs/unirestorer_arch.py``,
``init_experts.py``, ``inference.py``). **The repository has no licence** (all rights reserved by
default); its weights carry none either. This file is our own code, written from the behaviour
described in ``shared/parity/README.md`` and checked against the parity fixture; only the
module/parameter names follow upstream so ``model.pth["params"]`` loads with ``strict=True``.
Licence of this file: restore-cli's. The expert networks come from ``restormer.py``,
``lora_restormer.py``, ``dehazeformer.py`` (MIT upstream), ``retinexformer.py`` (MIT, spandrel)
and ``nafnet.py`` (MIT, spandrel); the degradation encoder from ``daclip.py`` (MIT upstream).

How the release routes (eval mode):

1. ``degra = daclip.encode_image(clip_lq, control=True)[1]`` (no gradient).
2. ``mu = self.mu(degra)``, ``logvar = self.sigma(degra)``: five bias-free 512×512 linears with
   LeakyReLU(0.1) between them, then BatchNorm1d (running statistics in eval).
3. Leaf logits = first half of ``lf_gate(mu)`` (22 of 44 outputs), granularity ("layer") logits =
   first half of ``layer_gate(logvar)`` (3 of 6); the second halves are the noise scales of the
   noisy top-k gating used in training. Softmax, top-1 of each: leaf ℓ and granularity g.
4. Expert = ``expert_indices_dict[ℓ][g]``, an index into the 30-expert pool (l0: 1 generalist,
   l1: 7 per degradation group, l2: 22 specialists = l2_experts 0..21). The output of a sample is
   exactly its expert's output (top-1: the gate factor g/g.detach() is 1).
5. ``aux_loss`` = 0.01 × squared coefficient of variation of the L1-normalised sum over the batch
   of the granularity probabilities (a 3-vector; zero only if it is uniform).

Layout quirks reproduced: ``l2_experts`` has 23 modules although only 0..21 are routable
(``l2_experts.22``, a NAFNetLocal, is in the checkpoint but never runs); ``gamma``, ``beta``
(parameters) and ``mean``, ``std`` (buffers) are in the state dict but unused.

Memory: the full-size model has 1.22 G elements (~4.9 GB in fp32; ~5 GB RAM to build). Building
it on the meta device and loading with ``load_state_dict(..., strict=True, assign=True)`` avoids
a second copy: the module has no non-persistent buffers, so nothing is left on the meta device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from restore_cli.models.daclip import DACLIP_VIT_B_32, DaCLIP, clip_preprocess
from restore_cli.models.dehazeformer import DEHAZEFORMER_L, DehazeFormer
from restore_cli.models.lora_restormer import LoRARestormer, PaddedRestormer
from restore_cli.models.nafnet import OFFICIAL_TRAIN_SIZE, build_nafnet_local
from restore_cli.models.registry import Architecture, ModelSpec, StateDict, register_architecture
from restore_cli.models.retinexformer import RETINEXFORMER_UNIRESTORER, build_retinexformer
from restore_cli.routing import Route, granularity_index

LICENCE = (
    "no licence (mrluin/UniRestorer @ 88b933cd: code and weights all rights reserved); "
    "this re-implementation: restore-cli's"
)
SOURCE = "https://github.com/mrluin/UniRestorer"
UPSTREAM_COMMIT = "88b933cd5cb5a2ba9c1c4f7349f244f36dea2e55"

# OpenAI CLIP normalisation (open_clip's OPENAI_DATASET_MEAN/STD).

RELEASE_NUM_EXPERTS = (1, 7, 22)
# The router layers are 512 wide; the DA-CLIP embedding must match.
ROUTER_WIDTH = 512
LEAKY_SLOPE = 0.1
CV_LOSS_WEIGHT = 0.01
CV_EPS = 1e-10
# Noisy top-k gating (training only): noise std = softplus(raw) + this.
NOISE_EPSILON = 1e-2

# Expert sizes of the release (init_experts_three_layers); per-kind kwargs of the constructor.
RELEASE_EXPERT_KWARGS: dict[str, dict[str, Any]] = {
    "restormer": {
        "inp_channels": 3,
        "out_channels": 3,
        "dim": 48,
        "num_blocks": [4, 6, 6, 8],
        "num_refinement_blocks": 4,
        "heads": [1, 2, 4, 8],
        "ffn_expansion_factor": 2.66,
        "bias": False,
        "dual_pixel_task": False,
    },
    "dehazeformer": dict(DEHAZEFORMER_L),
    "retinexformer": dict(RETINEXFORMER_UNIRESTORER),
    "nafnetlocal": {
        "width": 64,
        "enc_blk_nums": [1, 1, 1, 28],
        "middle_blk_num": 1,
        "dec_blk_nums": [1, 1, 1, 1],
        "train_size": list(OFFICIAL_TRAIN_SIZE),
    },
    "lora_restormer": {
        "inp_channels": 3,
        "out_channels": 3,
        "dim": 48,
        "num_blocks": [4, 6, 6, 8],
        "num_refinement_blocks": 4,
        "heads": [1, 2, 4, 8],
        "ffn_expansion_factor": 2.66,
        "bias": False,
        "dual_pixel_task": False,
        "LayerNorm_type": "WithBias",
        "r": [8, 8, 8, 8],
        "lora_alpha": [16, 16, 16, 16],
    },
}

# Module kinds in construction order, per ModuleList (kind, count).
_LEVEL_LAYOUT: dict[str, tuple[tuple[str, int], ...]] = {
    "l0_experts": (("restormer_withbias", 1),),
    "l1_experts": (
        ("restormer_biasfree", 4),
        ("dehazeformer", 1),
        ("retinexformer", 1),
        ("nafnetlocal", 1),
    ),
    "l2_experts": (
        ("restormer_biasfree", 3),
        ("lora_restormer", 4),
        ("restormer_withbias", 10),
        ("dehazeformer", 2),
        ("retinexformer", 2),
        ("nafnetlocal", 2),
    ),
}
# (prefix, kind) of every expert module, in construction (= state-dict) order: 1 + 7 + 23.
EXPERT_LAYOUT: tuple[tuple[str, str], ...] = tuple(
    (f"{level}.{index}", kind)
    for level, groups in _LEVEL_LAYOUT.items()
    for index, kind in enumerate(kind for kind, count in groups for _ in range(count))
)
EXPERT_KINDS = (
    "restormer_withbias",
    "restormer_biasfree",
    "lora_restormer",
    "dehazeformer",
    "retinexformer",
    "nafnetlocal",
)
# The routable pool: l0[0], l1[0..6], l2[0..21] (l2_experts.22 is never used).
EXPERT_POOL_PREFIXES: tuple[str, ...] = (
    "l0_experts.0",
    *(f"l1_experts.{i}" for i in range(7)),
    *(f"l2_experts.{i}" for i in range(22)),
)
# Leaf ℓ (= l2 specialist ℓ) belongs to the l1 group expert L1_OF_LEAF[ℓ] (pool index).
L1_OF_LEAF = (1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 5, 6, 6, 7, 7)
# expert_indices_dict[ℓ][g]: pool index of the expert for leaf ℓ at granularity g (0, 1, 2).
EXPERT_INDICES: tuple[tuple[int, int, int], ...] = tuple(
    (0, group, 8 + leaf) for leaf, group in enumerate(L1_OF_LEAF)
)


# ----------------------------------------------------------------------------- helpers


def router_body(width: int) -> nn.Sequential:
    """5 bias-free linears with LeakyReLU(0.1) between, then BatchNorm1d (keys 0,2,4,6,8,9)."""
    layers: list[nn.Module] = []
    for index in range(5):
        if index:
            layers.append(nn.LeakyReLU(LEAKY_SLOPE))
        layers.append(nn.Linear(width, width, bias=False))
    layers.append(nn.BatchNorm1d(width))
    return nn.Sequential(*layers)


def _expert_kwargs(experts: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Release kwargs per kind, updated key by key with the given ones."""
    given = dict(experts or {})
    unknown = sorted(set(given) - set(RELEASE_EXPERT_KWARGS))
    if unknown:
        raise ValueError(f"unknown expert kinds {unknown} (known: {list(RELEASE_EXPERT_KWARGS)})")
    if "LayerNorm_type" in given.get("restormer", {}):
        raise ValueError("restormer LayerNorm_type is fixed per expert position; do not pass it")
    return {kind: {**base, **given.get(kind, {})} for kind, base in RELEASE_EXPERT_KWARGS.items()}


def build_expert(kind: str, kwargs: Mapping[str, dict[str, Any]]) -> nn.Module:
    """One expert module of ``kind`` (see ``EXPERT_KINDS``) from per-kind kwargs."""
    if kind == "restormer_withbias":
        return PaddedRestormer(**kwargs["restormer"], LayerNorm_type="WithBias")
    if kind == "restormer_biasfree":
        return PaddedRestormer(**kwargs["restormer"], LayerNorm_type="BiasFree")
    if kind == "lora_restormer":
        return LoRARestormer(**kwargs["lora_restormer"])
    if kind == "dehazeformer":
        return DehazeFormer(**kwargs["dehazeformer"])
    if kind == "retinexformer":
        return build_retinexformer(**kwargs["retinexformer"])
    if kind == "nafnetlocal":
        return build_nafnet_local(kwargs["nafnetlocal"])
    raise ValueError(f"unknown expert kind {kind!r} (known: {EXPERT_KINDS})")


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (unbiased variance / mean²); 0 for a single value."""
    if values.shape[0] == 1:
        return values.new_zeros((), dtype=torch.float32)
    values = values.float()
    return values.var() / (values.mean() ** 2 + CV_EPS)


def layer_load_loss(layer_probs: torch.Tensor, weight: float = CV_LOSS_WEIGHT) -> torch.Tensor:
    """Upstream's aux loss: weight × cv² of the L1-normalised batch sum of the [B, 3] layer
    probabilities. cv² sees the 3-vector, so a batch of one gives 0 only for a uniform load."""
    return cv_squared(F.normalize(layer_probs.sum(0), p=1, dim=-1)) * weight


def unwrap_release_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of the released ``model.pth``: ``checkpoint["params"]``, ``module.`` dropped.

    A dict that already is a state dict (no ``params``) is accepted as it is.
    """
    state = checkpoint.get("params", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ValueError("not a UniRestorer checkpoint: expected a dict with 'params'")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if len(tensors) != len(state):
        raise ValueError("not a UniRestorer checkpoint: 'params' holds non-tensor entries")
    return {key.removeprefix("module."): value for key, value in tensors.items()}


# ----------------------------------------------------------------------------- the network


class UniRestorerRelease(nn.Module):
    """UniRestorer as released: ``forward(lq, daclip_lq) -> (output, mu, logvar, aux_loss)``.

    Constructor semantics follow upstream (whose ``daclip_model`` argument is a built DA-CLIP;
    here it is its open_clip config dict, the release's ``daclip_ViT-B-32`` by default). Expert
    sizes are hard-coded upstream; ``experts`` overrides them per kind (``restormer`` — the
    LayerNorm type is fixed per position —, ``lora_restormer``, ``dehazeformer``,
    ``retinexformer``, ``nafnetlocal``), the default being the released sizes.
    """

    def __init__(
        self,
        daclip_model_config: Mapping[str, Any] | None = None,
        experts: Mapping[str, Mapping[str, Any]] | None = None,
        embed_dim: int = ROUTER_WIDTH,
        num_feat: int = 48,
        topk: int = 1,
        num_experts: Sequence[int] = RELEASE_NUM_EXPERTS,
        noisy_topk_gating: bool = True,
        cv_loss_weight: float = CV_LOSS_WEIGHT,
    ) -> None:
        super().__init__()
        if tuple(num_experts) != RELEASE_NUM_EXPERTS:
            raise ValueError(f"the expert pool is fixed: num_experts must be {RELEASE_NUM_EXPERTS}")
        if topk != 1:
            # Upstream's expert selection only works for top-1 (it squeezes the top-k axis).
            raise NotImplementedError("only topk=1 (the release) is supported")
        self.embed_dim = embed_dim
        self.num_feat = num_feat  # stored, unused (as upstream)
        self.topk = topk
        self.num_experts = tuple(num_experts)
        self.num_lf_nodes = self.num_experts[-1]
        self.num_layers = len(self.num_experts)
        self.noisy_topk_gating = noisy_topk_gating
        self.cv_loss_weight = cv_loss_weight

        # Unused by forward but part of the checkpoint.
        self.gamma = nn.Parameter(torch.full((1,), 1e-4))
        self.beta = nn.Parameter(torch.full((1,), -7.0))
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("std", torch.ones(1))

        # Validate before building anything: the full-size parts are large.
        daclip_config = daclip_model_config or DACLIP_VIT_B_32
        if int(daclip_config["embed_dim"]) != embed_dim:
            raise ValueError(
                f"the router takes {embed_dim}-d DA-CLIP features; the DA-CLIP config has "
                f"embed_dim {daclip_config['embed_dim']}"
            )
        kwargs = _expert_kwargs(experts)
        self.expert_kwargs = kwargs
        self.daclip_model = DaCLIP(daclip_config)
        self.l0_experts = nn.ModuleList()
        self.l1_experts = nn.ModuleList()
        self.l2_experts = nn.ModuleList()
        for prefix, kind in EXPERT_LAYOUT:
            level = prefix.split(".", 1)[0]
            getattr(self, level).append(build_expert(kind, kwargs))

        gate_scale = 2 if noisy_topk_gating else 1
        self.mu = router_body(embed_dim)
        self.sigma = router_body(embed_dim)
        self.lf_gate = nn.Sequential(
            nn.Linear(embed_dim, gate_scale * self.num_lf_nodes, bias=False)
        )
        self.layer_gate = nn.Sequential(
            nn.Linear(embed_dim, gate_scale * self.num_layers, bias=False)
        )
        nn.init.zeros_(self.lf_gate[0].weight)
        nn.init.zeros_(self.layer_gate[0].weight)

    # ------------------------------------------------------------------ layout

    @property
    def expert_pool(self) -> list[nn.Module]:
        """The 30 routable experts in pool order (``EXPERT_POOL_PREFIXES``)."""
        return [self.get_submodule(prefix) for prefix in EXPERT_POOL_PREFIXES]

    @property
    def expert_indices_dict(self) -> torch.Tensor:
        """[22, 3] long: pool index of the expert for (leaf, granularity), on the model's device.

        Built on demand rather than stored as a buffer (it is not in the checkpoint)."""
        return torch.tensor(EXPERT_INDICES, dtype=torch.long, device=self.lf_gate[0].weight.device)

    @staticmethod
    def expert_kind(pool_index: int) -> str:
        """Kind (``EXPERT_KINDS``) of the expert at ``pool_index``."""
        return dict(EXPERT_LAYOUT)[EXPERT_POOL_PREFIXES[pool_index]]

    @property
    def clip_image_size(self) -> int:
        return self.daclip_model.image_size

    def clip_preprocess(self, images_rgb01: torch.Tensor, *, quantize: bool = True) -> torch.Tensor:
        """:func:`clip_preprocess` at this model's DA-CLIP input size (224 for the release)."""
        return clip_preprocess(images_rgb01, self.clip_image_size, quantize=quantize)

    # ------------------------------------------------------------------ routing

    def _logits(self, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Leaf and granularity logits; noisy (random) only in training mode, like upstream."""
        leaf = self.lf_gate(mu)
        layer = self.layer_gate(logvar)
        if not self.noisy_topk_gating:
            return leaf, layer
        leaf, leaf_raw = leaf.chunk(2, dim=-1)
        layer, layer_raw = layer.chunk(2, dim=-1)
        if self.training:
            leaf = leaf + torch.randn_like(leaf) * (F.softplus(leaf_raw) + NOISE_EPSILON)
            layer = layer + torch.randn_like(layer) * (F.softplus(layer_raw) + NOISE_EPSILON)
        return leaf, layer

    def route_clip(self, daclip_lq: torch.Tensor) -> dict[str, Any]:
        """Which expert each sample goes to, and why.

        ``daclip_lq``: CLIP-preprocessed images (:meth:`clip_preprocess`). Returns per sample:
        ``leaf`` [B] (0..21), ``granularity`` [B] (0 = generalist l0, 1 = group expert l1,
        2 = specialist l2), ``expert`` [B] (pool index 0..29), ``expert_prefix`` / ``expert_kind``
        (lists of str), ``leaf_probs`` [B,22] and ``layer_probs`` [B,3] (softmax of the logits),
        ``gate`` [B] (sum of the two top probabilities, as upstream's combine weight), and the
        router tensors ``mu``, ``logvar``, ``degra_features`` [B,512].
        """
        with torch.no_grad():
            _, degra_features = self.daclip_model.encode_image(daclip_lq, control=True)
        mu = self.mu(degra_features)
        logvar = self.sigma(degra_features)
        leaf_logits, layer_logits = self._logits(mu, logvar)
        leaf_probs = leaf_logits.softmax(dim=-1)
        layer_probs = layer_logits.softmax(dim=-1)
        leaf_top, leaf = (t.squeeze(-1) for t in leaf_probs.topk(1, dim=-1))
        layer_top, granularity = (t.squeeze(-1) for t in layer_probs.topk(1, dim=-1))
        expert = self.expert_indices_dict[leaf, granularity]
        return {
            "leaf": leaf,
            "granularity": granularity,
            "expert": expert,
            "expert_prefix": [EXPERT_POOL_PREFIXES[i] for i in expert.tolist()],
            "expert_kind": [self.expert_kind(i) for i in expert.tolist()],
            "leaf_probs": leaf_probs,
            "layer_probs": layer_probs,
            "gate": leaf_top + layer_top,
            "mu": mu,
            "logvar": logvar,
            "degra_features": degra_features,
        }

    def route(self, image: torch.Tensor, *, granularity: str | None = None) -> Route:
        """restore-cli's routed-model protocol: route whole images [B,3,H,W] in [0,1].

        The release estimates nothing but its 22 leaves and 3 granularities (DA-CLIP's type
        names would need its text tower and prompts), so the type columns stay empty.
        """
        routing = self.route_clip(self.clip_preprocess(image.float()))
        layer_probs = routing["layer_probs"].float()
        chosen = routing["granularity"]
        if granularity is not None:
            chosen = torch.full_like(chosen, granularity_index(granularity))
        expert = self.expert_indices_dict[routing["leaf"], chosen]
        batch = image.shape[0]
        return Route(
            expert_weights=F.one_hot(expert, len(EXPERT_POOL_PREFIXES)).float(),
            leaf=routing["leaf"],
            granularity=chosen,
            leaf_probs=routing["leaf_probs"].float(),
            granularity_probs=layer_probs,
            type_probs=torch.zeros(batch, 0),
            degree=torch.zeros(batch, 0),
            families=(),
            experts=EXPERT_POOL_PREFIXES,
        )

    def restore(self, lq: torch.Tensor, route: Route) -> torch.Tensor:
        """Run each sample (tile) through the expert its image was routed to."""
        pool = self.expert_pool
        experts = route.expert_weights.argmax(1)
        if experts.shape[0] == 1:
            experts = experts.expand(lq.shape[0])
        output: torch.Tensor | None = None
        for pool_index in torch.unique(experts).tolist():
            samples = torch.nonzero(experts == pool_index).flatten()
            restored = pool[pool_index](lq[samples])
            if output is None:
                output = restored.new_zeros((lq.shape[0], *restored.shape[1:]))
            output = output.index_copy(0, samples, restored)
        assert output is not None
        return output[:, :, : lq.shape[-2], : lq.shape[-1]]

    def forward(
        self,
        lq: torch.Tensor,
        daclip_lq: torch.Tensor | None = None,
        *,
        route: Route | None = None,
        granularity: str | None = None,
    ) -> Any:
        """(restored [B,3,H,W], mu [B,512], logvar [B,512], aux_loss scalar).

        That is the official call, ``forward(lq, daclip_lq)``. Without ``daclip_lq`` (the
        engine's call: tiles of one image plus the image's ``route``) it returns the restored
        tiles only.

        ``lq``: RGB in [0,1] at full resolution (each expert pads itself; RetinexFormer needs H
        and W divisible by 4); ``daclip_lq``: the CLIP-preprocessed same images. Each sample
        runs through its routed expert only (experts without gradient, as upstream); the
        output keeps the experts' dtype (upstream casts to float32).
        """
        if daclip_lq is None:
            if route is None:
                route = self.route(lq, granularity=granularity)
            return self.restore(lq, route)
        routing = self.route_clip(daclip_lq)
        gate = routing["gate"]
        # Top-1: the combine weight g/g.detach() is exactly 1 but carries the router gradient.
        scale = gate / gate.detach()
        pool = self.expert_pool
        output: torch.Tensor | None = None
        for pool_index in torch.unique(routing["expert"]).tolist():
            samples = torch.nonzero(routing["expert"] == pool_index).flatten()
            with torch.no_grad():
                restored = pool[pool_index](lq[samples])
            if output is None:
                output = restored.new_zeros((lq.shape[0], *restored.shape[1:]))
            output = output.index_copy(0, samples, restored)
        assert output is not None
        output = output * scale.to(output.dtype).view(-1, 1, 1, 1)
        height, width = lq.shape[-2:]
        return (
            output[:, :, :height, :width],
            routing["mu"],
            routing["logvar"],
            layer_load_loss(routing["layer_probs"], self.cv_loss_weight),
        )


# ----------------------------------------------------------------------------- registry


def detect_release(state_dict: StateDict) -> dict[str, Any] | None:
    """The release is recognised by its DA-CLIP and expert prefixes; sizes are the release's
    (a smaller test configuration must say so in its file header)."""
    if "l0_experts.0.patch_embed.proj.weight" in state_dict and any(
        key.startswith("daclip_model.") for key in state_dict
    ):
        return {}
    return None


def release_spec(config: Mapping[str, Any]) -> ModelSpec:
    # Every expert pads itself except RetinexFormer (H, W multiples of 4); 16 also makes the
    # NAFNetLocal experts' own zero padding a no-op. fp16 overflows in the Restormer experts and
    # bf16 is untested, so the engine runs the release in fp32.
    return ModelSpec(
        arch="unirestorer-release",
        size_multiple=16,
        supports_half=False,
        supports_bf16=False,
        routed=True,
    )


UNIRESTORER_RELEASE = register_architecture(
    Architecture(
        name="unirestorer-release",
        build=lambda config: UniRestorerRelease(**config),
        detect=detect_release,
        spec=release_spec,
        licence=LICENCE,
        source=SOURCE,
    )
)
