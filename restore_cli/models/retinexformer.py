"""RetinexFormer (Cai et al., ICCV 2023), as used by UniRestorer's low-light experts.

Upstream: caiyuanhao1998/Retinexformer (``basicsr/models/archs/RetinexFormer_arch.py``), MIT.
UniRestorer (mrluin/UniRestorer @ 88b933cd, no licence) uses a copy whose single stage also
returns the illumination map, which its ``RetinexFormer.forward`` unpacks and drops; for the
``stage=1`` configuration it uses, the output is the same as upstream's.

The network is spandrel's MIT-licensed copy of the upstream class (``spandrel.architectures.
RetinexFormer``): its parameter names and numerics match (checked against the UniRestorer parity
fixture, whose RetinexFormer experts are exercised by a routed sample), so we wrap it instead of
keeping a second copy. Licence: MIT (upstream code, spandrel's implementation).

Numerics worth knowing: there is no padding anywhere, so H and W must be multiples of 4 (two
stride-2 downsamplings); the illumination estimator's output lights the input
(``img·illu_map + img``) before the denoiser, whose output adds that lit input back.
"""

from __future__ import annotations

from typing import Any

from torch import nn

LICENCE = "MIT (caiyuanhao1998/Retinexformer; implementation from spandrel, MIT)"
SOURCE = "https://github.com/caiyuanhao1998/Retinexformer"

# Two stride-2 levels and no internal padding.
SIZE_MULTIPLE = 4
CONFIG_KEYS = ("in_channels", "out_channels", "n_feat", "stage", "num_blocks")
# The size of UniRestorer's low-light experts.
RETINEXFORMER_UNIRESTORER: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "n_feat": 40,
    "stage": 1,
    "num_blocks": [1, 2, 2],
}

__all__ = [
    "CONFIG_KEYS",
    "LICENCE",
    "RETINEXFORMER_UNIRESTORER",
    "SIZE_MULTIPLE",
    "SOURCE",
    "build_retinexformer",
]


def build_retinexformer(**kwargs: Any) -> nn.Module:
    """spandrel's RetinexFormer from upstream constructor kwargs (unknown keys are refused).

    Missing keys take UniRestorer's expert size (n_feat 40, 1 stage, blocks [1, 2, 2]), not the
    upstream class defaults, because that is the only size this project loads.

    The illumination estimator's depthwise conv uses 4 groups, so ``n_feat`` must be a multiple
    of 4 (checked here, because torch's error message would not say why).
    """
    unknown = sorted(set(kwargs) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"RetinexFormer: unknown options {unknown} (allowed: {CONFIG_KEYS})")
    config = {**RETINEXFORMER_UNIRESTORER, **kwargs}
    if int(config["n_feat"]) % 4:
        raise ValueError(f"RetinexFormer: n_feat must be a multiple of 4, not {config['n_feat']}")
    config["num_blocks"] = [int(n) for n in config["num_blocks"]]
    # Imported here: importing spandrel costs ~2 s of start-up (see nafnet.spandrel_nafnet).
    from spandrel.architectures.RetinexFormer import RetinexFormer

    return RetinexFormer(**config)
