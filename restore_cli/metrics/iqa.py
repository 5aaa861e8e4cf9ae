"""Every metric besides PSNR/SSIM, by its pyiqa name, strictly offline.

pyiqa (IQA-PyTorch) would download weights on first use: from its Hugging Face mirror into
``$TORCH_HOME/hub/pyiqa`` (``torch.hub.get_dir()/pyiqa``, the basename of the URL), torchvision
backbones into ``torch.hub.get_dir()/checkpoints``, CLIP into ``torch.hub.get_dir()/clip``, timm
backbones into the Hugging Face cache. Evaluation runs never download: a metric whose files are
not there fails with one line naming each missing file, its URL and the folder to put it in,
and the other metrics go on. Two layers make sure of it:

1. :data:`WEIGHT_FILES` lists what the common metrics need (read from pyiqa 0.1.16's code);
   they are checked *before* pyiqa is even imported, so the message lists every missing file.
2. While a metric is built, :func:`network_refused` replaces the download functions (torch.hub,
   pyiqa's copy of it, ``urllib.request.urlopen``) with ones that raise, and switches
   huggingface_hub to offline mode; whatever a metric not in the table tries to fetch becomes
   the same kind of one-line error instead of a hang.

pyiqa is optional (``pip install "restore-cli[iqa]"`` then ``pip install --no-deps
pyiqa==0.1.16``, see docs/metrics.md): its declared requirements pull in training tools we never
use, and its licence (PolyForm Noncommercial) must not become a requirement of restore-cli.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from restore_cli.errors import ConfigError, RestoreCliError

PYIQA_VERSION = "0.1.16"
INSTALL_HINT = f'pip install "restore-cli[iqa]" && pip install --no-deps pyiqa=={PYIQA_VERSION}'
PYIQA_URL = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
TORCHVISION_URL = "https://download.pytorch.org/models/"
CLIP_URL = "https://openaipublic.azureedge.net/clip/models/"
# Set-level metrics compare distributions of whole folders; they have no per-image value.
SET_LEVEL_METRICS = frozenset({"fid", "inception_score"})
# Python modules some pyiqa metrics import, and the package that provides each.
MODULE_PACKAGES = {
    "clip": "openai-clip",
    "pkg_resources": '"setuptools<81" (openai-clip still imports pkg_resources)',
    "timm": "timm",
    "einops": "einops",
    "facexlib": "facexlib",
    "transformers": "transformers",
    "scipy": "scipy",
}


class MetricUnavailable(RestoreCliError):
    """A metric cannot be built here (missing weights, package or module); one line."""


@dataclass(frozen=True)
class WeightFile:
    """One file a metric loads: where it is cached and where it comes from."""

    store: str  # "pyiqa", "torchvision", "clip" (folders under torch.hub.get_dir()), "hf"
    name: str  # file name in that folder (for "hf": the file inside the repo)
    url: str  # for "hf": the repo id, located through huggingface_hub's cache lookup

    def path(self) -> Path | None:
        """Where the file is (or must be put); None for a Hugging Face file not cached."""
        if self.store == "hf":
            cached = _huggingface_cached(self.url, self.name)
            return Path(cached) if cached else None
        return store_dir(self.store) / self.name

    def is_present(self) -> bool:
        path = self.path()
        return path is not None and path.is_file() and path.stat().st_size > 0

    def instruction(self) -> str:
        if self.store == "hf":
            return (
                f"{self.url}/{self.name} (Hugging Face; fetch it where there is network with "
                f"`hf download {self.url} {self.name}` and copy that cache into "
                f"{_huggingface_cache_dir()})"
            )
        return f"{self.name} from {self.url} → put it in {store_dir(self.store)}/"


def _pyiqa(name: str) -> WeightFile:
    return WeightFile("pyiqa", name, PYIQA_URL + name)


def _torchvision(name: str) -> WeightFile:
    return WeightFile("torchvision", name, TORCHVISION_URL + name)


def _clip(digest: str, name: str) -> WeightFile:
    return WeightFile("clip", name, f"{CLIP_URL}{digest}/{name}")


_ALEXNET = _torchvision("alexnet-owt-7be5be79.pth")
_VGG16 = _torchvision("vgg16-397923af.pth")
_CLIP_RN50 = _clip("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt")
_VIT_B8 = WeightFile("hf", "model.safetensors", "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k")
_NIQE = _pyiqa("niqe_modelparameters.mat")
_NRQM = _pyiqa("NRQM_model.mat")

WEIGHT_FILES: dict[str, tuple[WeightFile, ...]] = {
    "lpips": (_pyiqa("LPIPS_v0.1_alex-df73285e.pth"), _ALEXNET),
    "lpips-vgg": (_pyiqa("LPIPS_v0.1_vgg-a78928a0.pth"), _VGG16),
    "dists": (_pyiqa("DISTS_weights-f5e65c96.pth"), _VGG16),
    "niqe": (_NIQE,),
    "ilniqe": (_pyiqa("ILNIQE_templateModel.mat"),),
    "brisque": (_pyiqa("brisque_svm_weights.pth"),),
    "nrqm": (_NRQM,),
    "pi": (_NRQM, _NIQE),
    "musiq": (_pyiqa("musiq_koniq_ckpt-e95806b9.pth"),),
    "musiq-ava": (_pyiqa("musiq_ava_ckpt-e8d3f067.pth"),),
    "musiq-spaq": (_pyiqa("musiq_spaq_ckpt-358bb6af.pth"),),
    "musiq-paq2piq": (_pyiqa("musiq_paq2piq_ckpt-364c0c84.pth"),),
    "clipiqa": (_CLIP_RN50,),
    "clipiqa+": (_CLIP_RN50, _pyiqa("CLIP-IQA+_learned_prompts-603f3273.pth")),
    "maniqa": (_pyiqa("ckpt_koniq10k.pt"), _VIT_B8),
    "maniqa-kadid": (_pyiqa("ckpt_kadid10k.pt"), _VIT_B8),
    "maniqa-pipal": (_pyiqa("MANIQA_PIPAL-ae6d356b.pth"), _VIT_B8),
}
# Modes of the tabled metrics, so they are known even where pyiqa is not installed.
_TABLE_MODES = {"lpips": "FR", "lpips-vgg": "FR", "dists": "FR"}


def store_dir(store: str) -> Path:
    """The folder pyiqa / torchvision / CLIP read cached files from (follows $TORCH_HOME).

    pyiqa fixes its own folder when it is imported (``DEFAULT_CACHE_DIR``), so once it is
    loaded that value is the truth, even if $TORCH_HOME changed since.
    """
    if store == "pyiqa":
        loaded = sys.modules.get("pyiqa.utils.download_util")
        if loaded is not None and getattr(loaded, "DEFAULT_CACHE_DIR", None):
            return Path(loaded.DEFAULT_CACHE_DIR)
    folders = {"pyiqa": "pyiqa", "torchvision": "checkpoints", "clip": "clip"}
    return Path(torch.hub.get_dir()) / folders[store]


def missing_weight_files(name: str) -> list[WeightFile]:
    """Files of a tabled metric that are not in their cache (none for untabled metrics)."""
    return [file for file in WEIGHT_FILES.get(name, ()) if not file.is_present()]


def pyiqa_available() -> bool:
    return importlib.util.find_spec("pyiqa") is not None


def pyiqa_metric_modes() -> dict[str, str]:
    """pyiqa's metric names → "FR"/"NR", read from its config file without importing pyiqa
    (the import takes seconds, and the CLI needs the modes just to parse its arguments)."""
    spec = importlib.util.find_spec("pyiqa")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "default_model_configs.py"
    loader_spec = importlib.util.spec_from_file_location("_pyiqa_default_model_configs", path)
    if loader_spec is None or loader_spec.loader is None:
        return {}
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return {name: config["metric_mode"] for name, config in module.DEFAULT_CONFIGS.items()}


def metric_mode(name: str, modes: dict[str, str] | None = None) -> str:
    """Mode of a pyiqa metric name: "FR" (needs ground truth) or "NR".

    A name pyiqa does not know is a usage error (ConfigError). Without pyiqa installed, tabled
    names have their known mode and others count as "FR"; building them later reports the
    missing package as one line.
    """
    modes = pyiqa_metric_modes() if modes is None else modes
    if name in modes:
        return modes[name]
    if name in WEIGHT_FILES:
        return _TABLE_MODES.get(name, "NR")
    if not modes:
        return "FR"
    raise ConfigError(
        f"--metrics: unknown metric {name!r} (psnr, ssim, or a pyiqa {PYIQA_VERSION} name: "
        "see docs/metrics.md or pyiqa.list_models())"
    )


@dataclass
class IqaMetric:
    """A built pyiqa metric: ``metric(pred, gt)`` → one float64 value per image, on the CPU."""

    name: str
    full_reference: bool
    lower_better: bool
    model: Any

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
        if self.full_reference and gt is None:
            raise ValueError(f"{self.name} needs ground truth")
        with torch.inference_mode(), contextlib.redirect_stdout(io.StringIO()):
            output = self.model(pred, gt) if self.full_reference else self.model(pred)
        values = torch.as_tensor(output).detach().double().cpu().reshape(-1)
        if values.numel() != pred.shape[0]:
            raise ValueError(f"{self.name} returned {values.numel()} values for {pred.shape[0]}")
        return values


def load_iqa_metric(name: str, device: torch.device | str = "cpu") -> IqaMetric:
    """Build pyiqa metric ``name`` without network access, or raise :class:`MetricUnavailable`."""
    if name in SET_LEVEL_METRICS:
        raise MetricUnavailable(
            f"{name}: a set-level metric (one number per folder), not a per-image one; "
            "eval does not compute it"
        )
    missing = missing_weight_files(name)
    if missing:
        listed = "; ".join(file.instruction() for file in missing)
        raise MetricUnavailable(
            f"{name}: weights not in the cache (eval never downloads): {listed}"
        )
    if not pyiqa_available():
        raise MetricUnavailable(f"{name}: needs pyiqa, which is not installed ({INSTALL_HINT})")
    try:
        with network_refused(), _quiet():
            import pyiqa

            model = pyiqa.create_metric(name, device=torch.device(device), as_loss=False)
    except DownloadRefused as refused:
        raise MetricUnavailable(f"{name}: {refused}") from None
    except ModuleNotFoundError as error:
        module = (error.name or "").split(".")[0]
        package = MODULE_PACKAGES.get(module, module)
        raise MetricUnavailable(
            f"{name}: needs the Python module {module!r} (pip install {package})"
        ) from None
    except Exception as error:  # pyiqa raises assorted types; one line, the run goes on
        raise MetricUnavailable(f"{name}: cannot be built ({_describe(error)})") from None
    return IqaMetric(
        name=name,
        full_reference=model.metric_mode == "FR",
        lower_better=bool(model.lower_better),
        model=model,
    )


# ----------------------------------------------------------------------------- no network


class DownloadRefused(RuntimeError):
    """Raised in place of any download while a metric is being built."""

    def __init__(self, url: str, destination: Path | None) -> None:
        self.url = url
        self.destination = destination
        where = f" → put it at {destination}" if destination is not None else ""
        super().__init__(f"file not in the cache (eval never downloads): {url}{where}")


@contextlib.contextmanager
def network_refused() -> Iterator[None]:
    """Make every download path pyiqa uses raise :class:`DownloadRefused` instead.

    torch.hub (pyiqa's own copy of ``download_url_to_file`` included, and torchvision's
    ``load_state_dict_from_url``), ``urllib.request.urlopen`` (CLIP), and huggingface_hub's
    offline switch (timm). Patched on the module objects for the duration only.
    """
    import urllib.request

    import torch.hub

    def refuse_download(url: str, destination: str, *args: object, **kwargs: object) -> None:
        raise DownloadRefused(url, Path(destination))

    def refuse_urlopen(request: object, *args: object, **kwargs: object) -> None:
        raise DownloadRefused(str(getattr(request, "full_url", request)), None)

    patches: list[tuple[object, str, object]] = [
        (torch.hub, "download_url_to_file", refuse_download),
        (urllib.request, "urlopen", refuse_urlopen),
    ]
    with contextlib.suppress(ImportError):
        import pyiqa.utils.download_util as pyiqa_download

        patches.append((pyiqa_download, "download_url_to_file", refuse_download))
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants as hf_constants

        patches.append((hf_constants, "HF_HUB_OFFLINE", True))
    saved = [(target, attribute, getattr(target, attribute)) for target, attribute, _ in patches]
    hub_was_imported = any(attribute == "HF_HUB_OFFLINE" for _, attribute, _ in patches)
    previous_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub if it is first imported now
    try:
        for target, attribute, value in patches:
            setattr(target, attribute, value)
        yield
    finally:
        for target, attribute, value in saved:
            setattr(target, attribute, value)
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env
        if not hub_was_imported:
            _reset_huggingface_offline(previous_env)


def _reset_huggingface_offline(value: str | None) -> None:
    """huggingface_hub first imported inside :func:`network_refused` read HF_HUB_OFFLINE=1;
    give it back the user's setting so later weight downloads (restore models) still work."""
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = (value or "").strip().lower() in {"1", "on", "yes", "true"}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pyiqa prints "Loading pretrained model ..." on stdout, which belongs to pipelines, and
    torchvision warns about its deprecated ``pretrained=`` argument; neither helps the user."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _huggingface_cached(repo_id: str, filename: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def _huggingface_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return "~/.cache/huggingface/hub"
    return str(HF_HUB_CACHE)


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    name = type(error).__name__
    if "LocalEntryNotFound" in name or "OfflineModeIsEnabled" in name:
        return f"a Hugging Face file is not in the local cache and eval is offline ({name})"
    return f"{name}: {text[:200]}" if text else name
