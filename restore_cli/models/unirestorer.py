"""UniRestorer (Lin et al. 2025): a multi-granularity mixture of experts routed by degradation
*and* granularity estimation, architecture ``unirestorer``. Our compact, trainable version.

What the paper prescribes and how it is built here (mrluin/UniRestorer has no licence: read to
understand, nothing copied; its released network is :mod:`restore_cli.models.unirestorer_release`):

* Degradation representation: :class:`DegradationEncoder`, a small CNN trained here on the
  degradation library (types + degrees + contrastive term) instead of DA-CLIP, whose CLIP weights
  cannot be downloaded where we build; ``encoder: daclip`` puts the paper's frozen DA-CLIP in its
  place (:class:`DaclipDegradationEncoder`) for users who have its weights.
* Hierarchical clustering of the training set's embeddings: k-means into ``leaves`` fine
  clusters ("degree"), k-means of their centres into ``types`` clusters ("type"), and one root
  ("all"); stored in the weights as buffers, so routing is reproducible from the file alone.
* Experts: one per cluster at every granularity, ``1 + types + leaves`` in all. They share one
  NAFNet backbone and differ by low-rank deltas on every 1x1 convolution of every block (the
  release does the same for some experts with LoRA-Restormers; here all experts are LoRA experts
  so 29 of them fit in a few MiB). Mixing experts mixes their 1x1 weights per sample, which is
  exactly mixing those layers' outputs because the layers are linear.
* Routers: ``mu``/``sigma`` heads on the embedding (point estimate and log-variance, the paper's
  data-uncertainty formulation), a noisy gate over leaves on ``mu`` and a noisy gate over the
  three granularities on the log-variance; the expert is table[leaf][granularity].
* Training stages (``stage`` in the train config, see configs/unirestorer-s-*.yaml):
  ``encoder`` → (clustering, automatic at the start of the next stage) → ``experts`` (every
  sample restored by its own cluster's expert at a random granularity) → ``router``.
  Difference from the paper, on purpose: the granularity gate is trained with an explicit
  target, the granularity whose expert restores the sample best given the *predicted* leaf,
  rather than through the reconstruction loss times g/g.detach(); same intent (coarser when the
  degradation estimate is wrong), a direct and much cheaper signal on 2 CPU cores.
* Modes: auto (routers decide; at inference a low-light leaf only for crops the type head calls
  low light, ``low_light_veto``), instruction (``tasks=``: masks the leaves whose degradations
  are not among the named tasks), and a ``granularity=`` override for analysis.
* Low light, RetinexFormer-style (``illumination: width``, off when 0): the paper makes its
  low-light experts RetinexFormers. Here they stay low-rank deltas of the shared NAFNet, and the
  network gains RetinexFormer's one-stage Retinex front end (:class:`IlluminationEstimator`): a
  light-up map from the image and its channel mean lights the input (``x · map + x``), which is
  also the residual base, and the estimator's features guide the first level. Only routes to
  low-light experts use it (weighted by their gate), so every other route is unchanged. The
  shipped model has none (tried, measured and not shipped: docs/models.md). The full
  RetinexFormer is :mod:`restore_cli.models.retinexformer`, and in ``unirestorer-release``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from restore_cli.errors import ModelError
from restore_cli.models.degradation_encoder import (
    DEGREE_OF_LEVEL,
    DaclipDegradationEncoder,
    DegradationEncoder,
    EncoderHeads,
    supervised_contrastive,
)
from restore_cli.models.nafnet import LayerNorm2d
from restore_cli.models.registry import (
    Architecture,
    ModelSpec,
    StateDict,
    register_architecture,
    sequence_length,
)
from restore_cli.routing import GRANULARITIES, Route, granularity_index

if TYPE_CHECKING:
    from restore_cli.train.losses import WeightedLoss

STAGES = ("encoder", "experts", "router")
EXPERT_ROUTES = ("nearest", "auto")  # see UniRestorer.use_expert_route
ENCODERS = ("cnn", "daclip")
DEFAULT_FAMILIES = ("noise", "blur", "jpeg", "lowlight", "haze", "rain", "snow")
LICENCE = "MIT (restore-cli; architecture written and weights trained here)"
SOURCE = "https://github.com/mrluin/UniRestorer (paper); architecture and weights: restore-cli"

DEFAULTS: dict[str, Any] = {
    "families": list(DEFAULT_FAMILIES),
    "width": 16,
    "enc_blk_nums": [1, 1, 1, 2],
    "middle_blk_num": 1,
    "dec_blk_nums": [1, 1, 1, 1],
    "rank": 4,
    "leaves": 21,
    "types": 7,
    "embed_dim": 64,
    "encoder": "cnn",  # or "daclip": DA-CLIP's degradation features (daclip_config, ViT-B-32)
    "daclip_config": None,
    "encoder_width": 24,
    "encoder_crop": 128,
    "encoder_block_cues": True,
    "topk": 1,
    "cluster_samples": 2048,
    "illumination": 0,  # width of the low-light experts' illumination estimator; 0: none
    # auto mode: low-light leaves only for crops whose low-light probability reaches this; 0: off
    "low_light_veto": 0.5,
}


# ----------------------------------------------------------------------------- expert layers


class ExpertConv1x1(nn.Module):
    """A 1x1 conv shared by all experts plus one low-rank delta ``B_e A_e`` per expert.

    ``gates`` [B,E] (or [1,E] for a whole batch of tiles of one image) mixes the deltas:
    W_b = W + Σ_e g_be B_e A_e, applied per sample. Keys ``weight``/``bias`` equal a plain
    ``nn.Conv2d``'s, so a dense NAFNet's weights initialise the shared backbone.
    """

    def __init__(self, channels_in: int, channels_out: int, experts: int, rank: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels_out, channels_in, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels_out))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.lora_a = nn.Parameter(torch.randn(experts, rank, channels_in) / channels_in**0.5)
        self.lora_b = nn.Parameter(torch.zeros(experts, channels_out, rank))

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        deltas = torch.einsum("eor,eri->eoi", self.lora_b, self.lora_a)
        weights = self.weight[:, :, 0, 0] + torch.einsum("be,eoi->boi", gates.to(deltas), deltas)
        if weights.shape[0] == 1:  # one expert mix for the whole batch: a plain convolution
            return F.conv2d(x, weights[0, :, :, None, None].to(x.dtype), self.bias.to(x.dtype))
        batch, channels, height, width = x.shape
        out = torch.bmm(weights.to(x.dtype), x.reshape(batch, channels, height * width))
        return out.view(batch, -1, height, width) + self.bias.to(x.dtype)[:, None, None]


class ExpertNAFBlock(nn.Module):
    """NAFNet's block (same key names) with expert deltas on its four 1x1 convolutions."""

    def __init__(self, c: int, experts: int, rank: int) -> None:
        super().__init__()
        dw = 2 * c
        self.conv1 = ExpertConv1x1(c, dw, experts, rank)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = ExpertConv1x1(dw // 2, c, experts, rank)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.conv4 = ExpertConv1x1(c, 2 * c, experts, rank)
        self.conv5 = ExpertConv1x1(c, c, experts, rank)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(self.norm1(inp), gates))
        first, second = x.chunk(2, dim=1)
        x = first * second
        x = self.conv3(x * self.sca(x), gates)
        y = inp + x * self.beta
        first, second = self.conv4(self.norm2(y), gates).chunk(2, dim=1)
        return y + self.conv5(first * second, gates) * self.gamma


class IlluminationEstimator(nn.Module):
    """RetinexFormer's illumination estimator (Cai et al. 2023, our code): image + channel mean →
    1x1 conv → 5x5 depthwise conv (4 groups) → features, → 1x1 conv → light-up map (3 channels).

    The map's conv starts at zero, so an untrained estimator lights nothing (``x · 0 + x``) and
    a model that gains one restores exactly as before until it trains.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        if width % 4:
            raise ModelError(f"unirestorer illumination width {width}: must be a multiple of 4")
        self.conv1 = nn.Conv2d(4, width, 1)
        self.depth_conv = nn.Conv2d(width, width, 5, padding=2, groups=4)
        self.conv2 = nn.Conv2d(width, 3, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.depth_conv(self.conv1(torch.cat([x, x.mean(1, keepdim=True)], 1)))
        return features, self.conv2(features)


class ExpertNAFNet(nn.Module):
    """NAFNet's U-Net (same key names as ``nafnet``) whose blocks take expert gates, with an
    optional illumination front end for the low-light experts (``light``, see the module doc)."""

    def __init__(
        self,
        *,
        width: int,
        enc_blk_nums: Sequence[int],
        middle_blk_num: int,
        dec_blk_nums: Sequence[int],
        experts: int,
        rank: int,
        illumination: int = 0,
    ) -> None:
        super().__init__()
        self.intro = nn.Conv2d(3, width, 3, padding=1)
        self.illumination: IlluminationEstimator | None = None
        if illumination:
            self.illumination = IlluminationEstimator(illumination)
            self.illumination_guide = nn.Conv2d(illumination, width, 1)
            nn.init.zeros_(self.illumination_guide.weight)
            nn.init.zeros_(self.illumination_guide.bias)
        self.ending = nn.Conv2d(width, 3, 3, padding=1)
        self.encoders, self.decoders = nn.ModuleList(), nn.ModuleList()
        self.ups, self.downs = nn.ModuleList(), nn.ModuleList()
        channels = width
        for count in enc_blk_nums:
            self.encoders.append(
                nn.ModuleList(ExpertNAFBlock(channels, experts, rank) for _ in range(count))
            )
            self.downs.append(nn.Conv2d(channels, 2 * channels, 2, 2))
            channels *= 2
        self.middle_blks = nn.ModuleList(
            ExpertNAFBlock(channels, experts, rank) for _ in range(middle_blk_num)
        )
        for count in dec_blk_nums:
            self.ups.append(
                nn.Sequential(nn.Conv2d(channels, channels * 2, 1, bias=False), nn.PixelShuffle(2))
            )
            channels //= 2
            self.decoders.append(
                nn.ModuleList(ExpertNAFBlock(channels, experts, rank) for _ in range(count))
            )
        self.multiple = 2 ** len(enc_blk_nums)

    def forward(
        self, inp: torch.Tensor, gates: torch.Tensor, light: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``light`` [B] (or [1]): how much of each sample's route is low-light experts, the
        weight of the illumination front end (none when ``None`` or without one)."""
        height, width = inp.shape[-2:]
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        padded = F.pad(inp, (0, pad_w, 0, pad_h))
        if self.illumination is not None and light is not None and bool((light > 0).any()):
            weight = light.to(padded.dtype)[:, None, None, None]
            features, light_up = self.illumination(padded)
            padded = padded + weight * padded * light_up  # the lit input is the residual base
            x = self.intro(padded) + weight * self.illumination_guide(features)
        else:
            x = self.intro(padded)
        skips = []
        for blocks, down in zip(self.encoders, self.downs, strict=True):
            for block in blocks:
                x = block(x, gates)
            skips.append(x)
            x = down(x)
        for block in self.middle_blks:
            x = block(x, gates)
        for blocks, up, skip in zip(self.decoders, self.ups, reversed(skips), strict=True):
            x = up(x) + skip
            for block in blocks:
                x = block(x, gates)
        return (self.ending(x) + padded)[..., :height, :width]


# ----------------------------------------------------------------------------- routing


def mlp(dim: int, depth: int = 2) -> nn.Sequential:
    """The mu/sigma branches: bias-free linears with LeakyReLU(0.1) between (as the release)."""
    layers: list[nn.Module] = []
    for index in range(depth):
        layers.append(nn.Linear(dim, dim, bias=False))
        if index < depth - 1:
            layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


def noisy_logits(logits: torch.Tensor, noise: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Shazeer et al.'s noisy gating: learned per-input noise scale, training only."""
    return logits + torch.randn_like(logits) * F.softplus(noise(x))


# ----------------------------------------------------------------------------- clustering


def kmeans(
    points: torch.Tensor, k: int, seed: int, iterations: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic k-means (k-means++ seeding, Lloyd) in float64 → (centres, assignment).

    Written out (20 lines) rather than pulling in scikit-learn for one function; float64 and a
    seeded generator make the clusters identical on every machine for the same embeddings.
    """
    data = points.double().cpu()
    if data.shape[0] < k:
        raise ValueError(f"k-means: {data.shape[0]} points for {k} clusters")
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(data.shape[0], (1,), generator=generator))
    centres = [data[first]]
    distance = ((data - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        index = int(torch.multinomial(distance / distance.sum(), 1, generator=generator))
        centres.append(data[index])
        distance = torch.minimum(distance, ((data - data[index]) ** 2).sum(1))
    centre = torch.stack(centres)
    assignment = torch.zeros(data.shape[0], dtype=torch.long)
    for _ in range(iterations):
        assignment_new = torch.cdist(data, centre).argmin(1)
        for j in range(k):
            members = data[assignment_new == j]
            if len(members):
                centre[j] = members.mean(0)
            else:  # empty cluster: take the point farthest from its centre
                far = int(((data - centre[assignment_new]) ** 2).sum(1).argmax())
                centre[j] = data[far]
        if torch.equal(assignment_new, assignment):
            break
        assignment = assignment_new
    return centre.float(), torch.cdist(data, centre).argmin(1)


def chain_targets(
    chains: Sequence[str], families: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From recorded chains (JSON): multi-hot types [B,T], degree [B,T], type-set label [B]."""
    from restore_cli.degradations.pipeline import DEGRADATIONS

    index = {family: t for t, family in enumerate(families)}
    types = torch.zeros(len(chains), len(families))
    degree = torch.zeros(len(chains), len(families))
    for b, chain in enumerate(chains):
        for step in json.loads(chain):
            family = DEGRADATIONS[step["name"]].family
            if family in index:
                types[b, index[family]] = 1
                degree[b, index[family]] = DEGREE_OF_LEVEL[step["level"]]
    label = (types * (2 ** torch.arange(len(families)))).sum(1).long()
    return types, degree, label


# ----------------------------------------------------------------------------- the model


class UniRestorer(nn.Module):
    """Degradation encoder + hierarchical clusters + routers + expert NAFNet.

    ``forward(x, route=None, tasks=None, granularity=None)`` restores [B,3,h,w]; the engine
    computes ``route`` once per whole image (:meth:`route`) and passes it to every tile, so all
    tiles of an image use the same experts.
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        settings = {**DEFAULTS, **config}
        self.families = tuple(settings["families"])
        self.num_leaves, self.num_types = int(settings["leaves"]), int(settings["types"])
        self.topk = int(settings["topk"])
        self.low_light_veto = float(settings["low_light_veto"])
        self.cluster_samples = int(settings["cluster_samples"])
        self.num_experts = 1 + self.num_types + self.num_leaves
        embed = int(settings["embed_dim"])
        self.encoder: EncoderHeads
        if settings["encoder"] == "daclip":
            self.encoder = DaclipDegradationEncoder(
                len(self.families),
                embed_dim=embed,
                crop=int(settings["encoder_crop"]),
                daclip_config=settings["daclip_config"],
            )
        else:
            self.encoder = DegradationEncoder(
                len(self.families),
                width=int(settings["encoder_width"]),
                embed_dim=embed,
                crop=int(settings["encoder_crop"]),
                block_cues=bool(settings["encoder_block_cues"]),
            )
        self.mu = mlp(embed)
        self.sigma = mlp(embed)
        self.leaf_gate = nn.Linear(embed, self.num_leaves)
        self.leaf_noise = nn.Linear(embed, self.num_leaves)
        self.layer_gate = nn.Linear(embed, len(GRANULARITIES))
        self.layer_noise = nn.Linear(embed, len(GRANULARITIES))
        self.restorer = ExpertNAFNet(
            width=int(settings["width"]),
            enc_blk_nums=[int(n) for n in settings["enc_blk_nums"]],
            middle_blk_num=int(settings["middle_blk_num"]),
            dec_blk_nums=[int(n) for n in settings["dec_blk_nums"]],
            experts=self.num_experts,
            rank=int(settings["rank"]),
            illumination=int(settings["illumination"]),
        )
        families = len(self.families)
        self.register_buffer("leaf_centres", torch.zeros(self.num_leaves, embed))
        self.register_buffer("leaf_parent", torch.zeros(self.num_leaves, dtype=torch.long))
        self.register_buffer("leaf_families", torch.zeros(self.num_leaves, families))
        self.register_buffer("type_families", torch.zeros(self.num_types, families))
        self.register_buffer("clusters_fitted", torch.zeros((), dtype=torch.long))
        self.stage: str | None = None
        self.restoration_loss: WeightedLoss | None = None
        self.trained_experts: torch.Tensor | None = None  # [E] bool, see train_only_experts
        self.expert_route = "nearest"  # see use_expert_route

    # -- experts ---------------------------------------------------------------------------
    def expert_names(self) -> list[str]:
        """``all``, ``type<k>`` and ``degree<l>``: the expert ids of the route CSV."""
        return [
            "all",
            *(f"type{k}" for k in range(self.num_types)),
            *(f"degree{leaf}" for leaf in range(self.num_leaves)),
        ]

    def expert_index(self, leaf: torch.Tensor, granularity: torch.Tensor) -> torch.Tensor:
        """table[leaf][granularity] → expert id (0 = all, 1+k = type k, 1+K+l = leaf l)."""
        candidates = torch.stack(
            [torch.zeros_like(leaf), 1 + self.leaf_parent[leaf], 1 + self.num_types + leaf],
            dim=1,
        )
        return candidates.gather(1, granularity[:, None])[:, 0]

    def low_light_experts(self) -> torch.Tensor:
        """[E] bool: experts whose cluster's members are mostly low light (``all`` never is);
        they are the ones the illumination front end serves (RetinexFormer's in the paper)."""
        if "lowlight" not in self.families:
            return torch.zeros(self.num_experts, dtype=torch.bool, device=self.leaf_centres.device)
        column = self.families.index("lowlight")
        root = torch.zeros(1, dtype=torch.bool, device=self.leaf_centres.device)
        return torch.cat(
            [root, self.type_families[:, column] >= 0.5, self.leaf_families[:, column] >= 0.5]
        )

    def light_weight(self, gates: torch.Tensor) -> torch.Tensor | None:
        """[B] share of each sample's gates on low-light experts, or None without the front
        end (so a model without one runs exactly the old path)."""
        if self.restorer.illumination is None:
            return None
        return gates.float() @ self.low_light_experts().float()

    def task_families(self, tasks: Sequence[str]) -> set[str]:
        from restore_cli.degradations.pipeline import DEGRADATIONS

        task_of = {d.family: d.task for d in DEGRADATIONS.values()}
        return {family for family in self.families if task_of.get(family) in set(tasks)}

    def allowed_leaves(self, tasks: Sequence[str]) -> torch.Tensor:
        """Instruction mode's mask: leaves whose members' degradations are all among ``tasks``."""
        wanted = torch.tensor([f in self.task_families(tasks) for f in self.families])
        present = self.leaf_families >= 0.5
        inside = ~(present & ~wanted.to(present.device)).any(1)
        touches = (present & wanted.to(present.device)).any(1)
        allowed = inside & touches
        if not allowed.any():  # no pure leaf (e.g. only mixtures): any leaf touching the tasks
            allowed = touches
        if not allowed.any():
            raise ModelError(f"no expert of this model was trained for {', '.join(tasks)}")
        return allowed

    # -- routing ---------------------------------------------------------------------------
    def route(
        self,
        image: torch.Tensor,
        *,
        tasks: Sequence[str] | None = None,
        granularity: str | None = None,
    ) -> Route:
        """Route whole images [B,3,H,W]: encoder → mu/logvar → leaf and granularity gates."""
        if not bool(self.clusters_fitted):
            raise ModelError("this UniRestorer has no degradation clusters yet (untrained)")
        embedding, type_logits, degree = self.encoder.encode_image(image)
        return self.route_embedding(embedding, type_logits, degree, tasks, granularity)

    def route_embedding(
        self,
        embedding: torch.Tensor,
        type_logits: torch.Tensor,
        degree: torch.Tensor,
        tasks: Sequence[str] | None = None,
        granularity: str | None = None,
    ) -> Route:
        mu, logvar = self.mu(embedding), self.sigma(embedding)
        leaf_logits = self.leaf_gate(mu).float()
        if tasks:
            leaf_logits = leaf_logits.masked_fill(~self.allowed_leaves(tasks), float("-inf"))
        elif self.low_light_veto > 0 and not self.training:
            leaf_logits = self.veto_low_light(leaf_logits, type_logits)
        layer_logits = self.layer_gate(logvar).float()
        if granularity is not None:
            fixed = torch.full_like(layer_logits, float("-inf"))
            fixed[:, granularity_index(granularity)] = 0
            layer_logits = fixed
        leaf_probs, layer_probs = leaf_logits.softmax(1), layer_logits.softmax(1)
        weights = self.expert_mixture(leaf_probs, layer_probs, self.topk)
        return Route(
            expert_weights=weights,
            leaf=leaf_probs.argmax(1),
            granularity=layer_probs.argmax(1),
            leaf_probs=leaf_probs,
            granularity_probs=layer_probs,
            type_probs=torch.sigmoid(type_logits.float()),
            degree=degree.float(),
            families=self.families,
            experts=tuple(self.expert_names()),
        )

    def veto_low_light(self, leaf_logits: torch.Tensor, type_logits: torch.Tensor) -> torch.Tensor:
        """Auto mode: no low-light leaf for a crop the type head does not call low light.

        A low-light expert relights the whole image, so sending it a normally exposed photo is
        the costliest misroute (``examples/blurry-picos.png``: 25.1 dB in, 16.1 out). The leaf
        gate and the type head read the same embedding but were trained apart (cluster vs
        labels), and such a crop is where they disagree; the type head wins for this one family.
        Inference only: training (``expert_route: auto``) keeps the router's own traffic, so the
        shipped stages' configs reproduce their weights.
        """
        low_leaf = self.low_light_experts()[1 + self.num_types :]
        if not bool(low_leaf.any()) or bool(low_leaf.all()):
            return leaf_logits
        column = self.families.index("lowlight")
        dark = torch.sigmoid(type_logits.float()[:, column]) >= self.low_light_veto
        return leaf_logits.masked_fill(~dark[:, None] & low_leaf[None], float("-inf"))

    def expert_mixture(
        self, leaf_probs: torch.Tensor, layer_probs: torch.Tensor, topk: int
    ) -> torch.Tensor:
        """Top-k (leaf, granularity) pairs by joint probability → normalised expert weights."""
        batch = leaf_probs.shape[0]
        joint = (leaf_probs[:, :, None] * layer_probs[:, None, :]).reshape(batch, -1)
        values, pairs = joint.topk(min(topk, joint.shape[1]), dim=1)
        leaf, granularity = pairs // len(GRANULARITIES), pairs % len(GRANULARITIES)
        experts = self.expert_index(leaf.flatten(), granularity.flatten()).view_as(pairs)
        weights = torch.zeros(batch, self.num_experts, device=leaf_probs.device)
        weights.scatter_add_(1, experts, values)
        return weights / weights.sum(1, keepdim=True).clamp(min=1e-12)

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        *,
        route: Route | None = None,
        tasks: Sequence[str] | None = None,
        granularity: str | None = None,
        stage: str | None = None,
        batch: Mapping[str, Any] | None = None,
    ) -> Any:
        if stage is not None:  # training goes through forward so DistributedDataParallel sees it
            return self.training_losses(x, batch or {}, stage)
        if route is None:
            route = self.route(x, tasks=tasks, granularity=granularity)
        gates = route.expert_weights
        return self.restorer(x, gates, self.light_weight(gates))

    # -- training --------------------------------------------------------------------------
    def use_restoration_loss(self, loss: WeightedLoss) -> None:
        """The experts stage restores with the train config's ``losses`` (Charbonnier when none
        is set); the other stages have objectives of their own."""
        self.restoration_loss = loss

    def set_stage(self, stage: str) -> None:
        """Freeze everything but what ``stage`` trains."""
        if stage not in STAGES:
            raise ModelError(f"unknown UniRestorer stage {stage!r} (valid: {', '.join(STAGES)})")
        self.stage = stage
        trained = {
            "encoder": self.encoder.trainable(),
            "experts": [self.restorer],
            "router": [self.mu, self.sigma, self.leaf_gate, self.leaf_noise, self.layer_gate],
        }[stage]
        if stage == "router":
            trained.append(self.layer_noise)
        self.requires_grad_(False)
        for module in trained:
            module.requires_grad_(True)
        self.train(self.training)

    def train_only_experts(self, names: Sequence[str]) -> None:
        """Experts stage on a few experts: only their low-rank deltas learn (e.g. ``degree8``).

        Every other weight is frozen, and a gradient hook zeroes the other experts' rows of the
        stacked deltas (whatever the gates mix): with no weight decay, every route that uses
        none of ``names`` restores bit for bit as before. Each sample trains a granularity whose
        expert is among ``names``; a sample with none is left out of the loss. The illumination
        front end, used only by low-light experts, trains when one of them is named.
        """
        if self.stage != "experts":
            raise ModelError("training only some experts needs model.stage 'experts'")
        known = self.expert_names()
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise ModelError(
                f"unknown expert names {unknown} (valid: all, type0..type{self.num_types - 1}, "
                f"degree0..degree{self.num_leaves - 1})"
            )
        mask = torch.tensor([name in set(names) for name in known])
        self.trained_experts = mask.to(self.leaf_centres.device)
        self.requires_grad_(False)
        illumination = self.restorer.illumination
        low_light = self.trained_experts & self.low_light_experts()
        if illumination is not None and bool(low_light.any()):
            # the front end belongs to the low-light experts: it learns with them
            illumination.requires_grad_(True)
            self.restorer.illumination_guide.requires_grad_(True)
        rows = self.trained_experts.float()[:, None, None]
        for module in self.restorer.modules():
            if isinstance(module, ExpertConv1x1):
                for delta in (module.lora_a, module.lora_b):
                    delta.requires_grad_(True)
                    # a sample's gates may mix in other experts (top-k > 1): their rows
                    # still get no gradient
                    delta.register_hook(lambda grad, rows=rows: grad * rows.to(grad))

    def use_expert_route(self, name: str) -> None:
        """Which expert each crop trains in the experts stage.

        ``nearest`` (the paper's): the leaf whose centre is nearest the crop's embedding, at a
        uniform random granularity, so every expert learns its own cluster. ``auto``: the
        expert auto mode would give the crop (the router's leaf and granularity gates, without
        their training noise), so each expert learns the traffic it actually serves at restore
        time, misrouted crops included, and experts auto mode never picks get no crops.
        """
        if name not in EXPERT_ROUTES:
            raise ModelError(f"unknown expert route {name!r} (valid: {', '.join(EXPERT_ROUTES)})")
        if name != "nearest" and self.stage != "experts":
            raise ModelError(f"expert route {name!r} needs model.stage 'experts'")
        self.expert_route = name

    def training_gates(
        self, embedding: torch.Tensor, type_logits: torch.Tensor, degree: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The experts stage's gates [B,E] per sample (see :meth:`use_expert_route`), and which
        samples reach a trained expert (None when every expert trains)."""
        if self.expert_route == "auto":
            with torch.no_grad():
                gates = self.route_embedding(embedding, type_logits, degree).expert_weights
            if self.trained_experts is None:
                return gates, None
            return gates, (gates[:, self.trained_experts] > 0).any(1)
        leaf = torch.cdist(embedding, self.leaf_centres).argmin(1)
        granularity, keep = self.training_granularity(leaf)
        gates = F.one_hot(self.expert_index(leaf, granularity), self.num_experts).float()
        return gates, keep

    def training_granularity(self, leaf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The experts stage's granularity per sample: uniform, or (with
        :meth:`train_only_experts`) uniform among those whose expert trains, plus which samples
        have one (None when every expert trains)."""
        if self.trained_experts is None:
            return torch.randint(len(GRANULARITIES), leaf.shape, device=leaf.device), None
        experts = torch.stack(
            [self.expert_index(leaf, torch.full_like(leaf, g)) for g in range(len(GRANULARITIES))],
            1,
        )
        allowed = self.trained_experts[experts]
        draw = torch.rand(allowed.shape, device=leaf.device).masked_fill(~allowed, -1.0)
        return draw.argmax(1), allowed.any(1)

    def train(self, mode: bool = True) -> UniRestorer:
        """Frozen parts stay in eval mode: the encoder's BatchNorm statistics must not drift
        (nor depend on the batch) while the experts and routers learn on its embeddings."""
        super().train(mode)
        if self.stage in ("experts", "router"):
            self.encoder.eval()
        if self.stage == "router":
            self.restorer.eval()
        return self

    def loss_names(self, stage: str) -> list[str]:
        restoring = self.restoration_loss.names if self.restoration_loss else ["loss_charbonnier"]
        return {
            "encoder": ["loss_type", "loss_degree", "loss_contrastive", "type_accuracy"],
            "experts": restoring,
            "router": ["loss_leaf", "loss_uncertainty", "loss_granularity", "loss_balance"],
        }[stage]

    @torch.no_grad()
    def fit_clusters(self, embeddings: torch.Tensor, families: torch.Tensor, seed: int) -> None:
        """The multi-granularity degradation set: leaves by k-means of the embeddings, types by
        k-means of the leaf centres; each cluster remembers which degradations its members had
        (the instruction-mode masks)."""
        centres, assignment = kmeans(embeddings, self.num_leaves, seed)
        _, parent = kmeans(centres, self.num_types, seed + 1)
        leaf_families = torch.stack(
            [families[assignment == leaf].mean(0) for leaf in range(self.num_leaves)]
        ).nan_to_num(0.0)
        sizes = torch.bincount(assignment, minlength=self.num_leaves).float()
        type_families = torch.zeros(self.num_types, families.shape[1])
        type_families.index_add_(0, parent, leaf_families * sizes[:, None])
        type_families /= (
            torch.zeros(self.num_types).index_add_(0, parent, sizes)[:, None].clamp(min=1)
        )
        device = self.leaf_centres.device
        self.leaf_centres.copy_(F.normalize(centres, dim=1).to(device))
        self.leaf_parent.copy_(parent.to(device))
        self.leaf_families.copy_(leaf_families.to(device))
        self.type_families.copy_(type_families.to(device))
        self.clusters_fitted.fill_(1)

    def prepare_training(self, dataset: Any, seed: int) -> None:
        """Fit the clusters from ``cluster_samples`` fresh training items if none are stored."""
        if self.stage in (None, "encoder") or bool(self.clusters_fitted):
            return
        device = self.leaf_centres.device
        epoch = getattr(dataset, "epoch", 0)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(10**9)  # a seed range the training epochs never reach
        embeddings, types = [], []
        try:
            for start in range(0, self.cluster_samples, 64):
                items = [dataset[i] for i in range(start, min(start + 64, self.cluster_samples))]
                lq = torch.stack([item["lq"] for item in items]).to(device)
                with torch.no_grad():
                    embeddings.append(self.encoder(lq)[0].cpu())
                types.append(chain_targets([item["chain"] for item in items], self.families)[0])
        finally:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
        self.fit_clusters(torch.cat(embeddings), torch.cat(types), seed)

    def training_losses(
        self, lq: torch.Tensor, batch: Mapping[str, Any], stage: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, named parts) of one batch for ``stage``."""
        targets = chain_targets(batch["chain"], self.families)
        types, degree, label = (t.to(lq.device) for t in targets)
        if stage == "encoder":
            embedding, type_logits, degree_pred = self.encoder(lq)
            loss_type = F.binary_cross_entropy_with_logits(type_logits, types)
            present = types > 0
            loss_degree = (degree_pred - degree).abs()[present].mean()
            loss_con = supervised_contrastive(embedding, label)
            accuracy = ((type_logits > 0) == present).all(1).float().mean()
            total = loss_type + loss_degree + 0.1 * loss_con
            return total, {
                "loss_type": loss_type,
                "loss_degree": loss_degree,
                "loss_contrastive": loss_con,
                "type_accuracy": accuracy,
            }
        gt = batch["gt"].to(lq.device)
        with torch.no_grad():
            embedding, type_logits, degree_pred = self.encoder(lq)
        if stage == "experts":
            gates, keep = self.training_gates(embedding, type_logits, degree_pred)
            scale = 1.0
            if keep is not None:  # only some experts train: the other samples teach nothing
                if keep.any():
                    lq, gt, gates = lq[keep], gt[keep], gates[keep]
                else:  # a zero loss keeps the step (and DDP's all-reduce) in step
                    scale = 0.0
            pred = self.restorer(lq, gates, self.light_weight(gates))
            if self.restoration_loss is not None:
                total, parts = self.restoration_loss(pred, gt)
                return total * scale, parts
            from restore_cli.train.losses import charbonnier_loss  # training only: lazily

            loss = charbonnier_loss(pred, gt)
            return loss * scale, {"loss_charbonnier": loss}
        # router: leaf classification + data uncertainty + best-granularity target + balance
        leaf = torch.cdist(embedding, self.leaf_centres).argmin(1)
        mu, logvar = self.mu(embedding), self.sigma(embedding)
        leaf_logits = noisy_logits(self.leaf_gate(mu), self.leaf_noise, mu)
        loss_leaf = F.cross_entropy(leaf_logits, leaf)
        centre = self.leaf_centres[leaf]
        loss_unc = (((mu - centre) ** 2) / (2 * logvar.exp()) + logvar / 2).mean()
        predicted = leaf_logits.detach().argmax(1)
        with torch.no_grad():
            errors = []
            for g in range(len(GRANULARITIES)):
                chosen = torch.full_like(predicted, g)
                gates = F.one_hot(self.expert_index(predicted, chosen), self.num_experts).float()
                pred = self.restorer(lq, gates, self.light_weight(gates))
                errors.append((pred - gt).abs().mean(dim=(1, 2, 3)))
            best = torch.stack(errors, 1).argmin(1)
        layer_logits = noisy_logits(self.layer_gate(logvar), self.layer_noise, logvar)
        loss_granularity = F.cross_entropy(layer_logits, best)
        load = layer_logits.softmax(1).sum(0)
        loss_balance = load.var() / load.mean() ** 2
        total = loss_leaf + 0.1 * loss_unc + loss_granularity + 0.01 * loss_balance
        return total, {
            "loss_leaf": loss_leaf,
            "loss_uncertainty": loss_unc,
            "loss_granularity": loss_granularity,
            "loss_balance": loss_balance,
        }


# ----------------------------------------------------------------------------- registry


CONFIG_KEYS = tuple(DEFAULTS)


def checked_config(config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ModelError(
            f"unirestorer config has unknown keys {unknown} (allowed: {', '.join(CONFIG_KEYS)})"
        )
    settings = {**DEFAULTS, **config}
    from restore_cli.degradations.pipeline import families

    known = families()
    bad = [f for f in settings["families"] if f not in known]
    if bad:
        raise ModelError(f"unirestorer families {bad} unknown (valid: {', '.join(known)})")
    if settings["encoder"] not in ENCODERS:
        raise ModelError(
            f"unirestorer encoder {settings['encoder']!r} unknown (valid: {', '.join(ENCODERS)})"
        )
    if int(settings["types"]) > int(settings["leaves"]):
        raise ModelError("unirestorer config: 'types' must not exceed 'leaves'")
    return dict(config)


def build_unirestorer(config: Mapping[str, Any]) -> nn.Module:
    return UniRestorer(**checked_config(config))


def unirestorer_spec(config: Mapping[str, Any]) -> ModelSpec:
    from restore_cli.degradations.pipeline import DEGRADATIONS

    settings = {**DEFAULTS, **checked_config(config)}
    task_of = {d.family: d.task for d in DEGRADATIONS.values()}
    return ModelSpec(
        arch="unirestorer",
        size_multiple=2 ** len(settings["enc_blk_nums"]),
        tasks=tuple(task_of[f] for f in settings["families"]),
        instructable=True,
        routed=True,
    )


def detect_unirestorer(state_dict: StateDict) -> dict[str, Any] | None:
    """Read the config of one of our UniRestorer files back from its tensor shapes (the CNN
    encoder's; a DA-CLIP-encoder file is read with the config in its header)."""
    if "leaf_centres" not in state_dict or "restorer.intro.weight" not in state_dict:
        return None
    if "encoder.stem.weight" not in state_dict:
        return None

    def blocks(prefix: str, count: int) -> list[int]:
        return [sequence_length(state_dict, f"restorer.{prefix}.{i}") for i in range(count)]

    levels = sequence_length(state_dict, "restorer.downs")
    leaves, embed = state_dict["leaf_centres"].shape
    num_families = state_dict["leaf_families"].shape[1]
    if num_families != len(DEFAULT_FAMILIES):
        return None  # family names are not in the shapes; such files need their header config
    intro = state_dict["restorer.intro.weight"]
    first_lora = next(v for k, v in state_dict.items() if k.endswith("conv1.lora_a"))
    stem = state_dict["encoder.stem.weight"]
    encoder_width = int(stem.shape[0])
    pooled = int(state_dict["encoder.project.0.weight"].shape[0])
    light = state_dict.get("restorer.illumination.conv1.weight")
    return {
        "families": list(DEFAULT_FAMILIES),
        "width": int(intro.shape[0]),
        "enc_blk_nums": blocks("encoders", levels),
        "middle_blk_num": sequence_length(state_dict, "restorer.middle_blks"),
        "dec_blk_nums": blocks("decoders", sequence_length(state_dict, "restorer.ups")),
        "rank": int(first_lora.shape[1]),
        "leaves": int(leaves),
        "types": int(state_dict["type_families"].shape[0]),
        "embed_dim": int(embed),
        "encoder_width": encoder_width,
        # the pooled statistics: 2·(stem + 10·width) CNN channels, 6 of the input, 2 block cues
        "encoder_block_cues": pooled == 22 * encoder_width + 8,
        "illumination": int(light.shape[0]) if light is not None else 0,
    }


UNIRESTORER = register_architecture(
    Architecture(
        name="unirestorer",
        build=build_unirestorer,
        detect=detect_unirestorer,
        spec=unirestorer_spec,
        licence=LICENCE,
        source=SOURCE,
    )
)
