"""The `train` feature: build everything from the config, run the iterations, log, checkpoint.

One process trains on one device; under ``torchrun`` every process does the same on its own
device and DistributedDataParallel averages the gradients (rank 0 alone validates, logs and
writes checkpoints). Resuming restores the weights, EMA, optimizer, scheduler, grad scaler, RNG
states and step; as the data of each step is a pure function of (seed, step) (see
:mod:`restore_cli.train.data`), a resumed run on the CPU is bit for bit the uninterrupted one.

Stopping early is always clean: Ctrl-C / SIGTERM (``torchrun``, Slurm and time-limited job
runners send it), ``--max-minutes`` and ``--stop-at`` finish the current iteration and write a
checkpoint, so ``--resume auto`` continues from there.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import gc
import io
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from restore_cli.errors import ConfigError, ModelError, RestoreCliError
from restore_cli.io.atomic import atomic_write_bytes
from restore_cli.train.checkpoint import (
    Checkpoint,
    capture_rng_states,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    resolve_resume,
    restore_rng_states,
    save_checkpoint,
    weights_bytes,
    weights_metadata,
)
from restore_cli.train.config import (
    InitWeights,
    TrainConfig,
    dump_config,
    load_config,
    parse_config,
)
from restore_cli.train.data import (
    StepBatchSampler,
    ValImage,
    build_train_dataset,
    build_train_loader,
    load_val_set,
)
from restore_cli.train.ema import ModelEma
from restore_cli.train.losses import WeightedLoss

EXIT_OK, EXIT_INTERRUPTED = 0, 130
EXIT_TIME_LIMIT = 75  # EX_TEMPFAIL: stopped at --max-minutes; rerun with --resume auto
RUNS_DIR = Path("runs")
CONFIG_NAME = "config.yaml"
LOG_NAME = "log.csv"
VAL_LOG_NAME = "val.csv"
FINAL_NAME = "final.safetensors"
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainOptions:
    """What the `train` command was asked to do (the config itself is a file)."""

    config: Path
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE
    resume: str | None = None  # None, "auto", or a checkpoint / run folder path
    run_dir: Path | None = None  # default: runs/<config file stem>
    max_minutes: float | None = None  # stop with a checkpoint after this much wall time
    stop_at: int | None = None  # stop with a checkpoint after this global iteration
    quiet: bool = False


@dataclass
class TrainResult:
    exit_code: int
    step: int
    run_dir: Path
    model: nn.Module  # the bare network (not the DDP wrapper)
    ema: ModelEma | None


def train(options: TrainOptions, stderr: TextIO | None = None) -> int:
    """Run (or continue) a training run; returns the process exit code."""
    return run_training(options, stderr).exit_code


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def start_distributed(config: TrainConfig) -> tuple[Distributed, torch.device]:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, …):
    NCCL on CUDA, gloo on the CPU; one CUDA device per process (LOCAL_RANK)."""
    from restore_cli.engine import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), resolve_device(config.device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = config.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        torch.distributed.init_process_group(backend, init_method="env://")
    return Distributed(rank, local_rank, world), device


def stop_distributed(distributed: Distributed) -> None:
    """Leave the job while the interpreter is fully alive. The Trainer sits in reference
    cycles, so without the collection its DDP wrapper (and the gloo work it holds) would be
    freed only at interpreter shutdown, where a gloo thread touching a Python object aborts
    the process ("terminate called without an active exception", exit -6) after a good run."""
    if distributed.enabled and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- building blocks


def build_model(config: TrainConfig) -> nn.Module:
    from restore_cli.models.registry import get_architecture

    arch = get_architecture(config.model.arch)
    try:
        return arch.build(dict(config.model.config))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config key 'model.config': {error}") from None


def load_init_weights(module: nn.Module, init: InitWeights) -> str:
    """Copy ``init.path``'s tensors into ``module`` under ``init.prefix``; returns a log line.

    Every tensor of the file must land on a parameter or buffer of the same shape (a typo'd
    prefix or another architecture fails loudly); the module may have more (new layers keep
    their fresh initialisation), which is the point of starting a larger model from a smaller.
    """
    from restore_cli.models.loading import read_state_dict

    path = Path(init.path).expanduser()
    weights = read_state_dict(path)
    own = module.state_dict()
    renamed = {init.prefix + key: value for key, value in weights.items()}
    unknown = [key for key in renamed if key not in own]
    wrong = [key for key in renamed if key in own and own[key].shape != renamed[key].shape]
    if unknown or wrong:
        first = (unknown or wrong)[0]
        raise ConfigError(
            f"config key 'model.init': {path}: {len(unknown)} tensors with no place in the model "
            f"and {len(wrong)} of another shape (first: {first})"
        )
    module.load_state_dict(renamed, strict=False)
    return f"initialised {len(renamed)} of {len(own)} tensors from {path}"


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    settings = config.optimizer
    kind = torch.optim.AdamW if settings.type == "adamw" else torch.optim.Adam
    return kind(
        [p for p in model.parameters() if p.requires_grad],
        lr=settings.lr,
        betas=settings.betas,
        weight_decay=settings.weight_decay,
    )


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``optimizer.lr`` during iteration ``step`` (0-based).

    Linear warm-up over ``warmup`` iterations from lr/warmup, then: cosine from lr down to
    ``min_lr`` at the last iteration, or ×gamma at each milestone, or constant.
    """
    schedule = config.scheduler
    if step < schedule.warmup:
        return (step + 1) / schedule.warmup
    if schedule.type == "constant":
        return 1.0
    if schedule.type == "multistep":
        return schedule.gamma ** bisect.bisect_right(schedule.milestones, step)
    span = max(config.iterations - 1 - schedule.warmup, 1)
    progress = min((step - schedule.warmup) / span, 1.0)
    floor = min(schedule.min_lr / config.optimizer.lr, 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, config)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_precision(config: TrainConfig, device: torch.device) -> None:
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "config key 'precision': fp16 training needs CUDA (use bf16 or fp32 on the CPU)"
        )
    if config.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("config key 'precision': this GPU has no bf16; use fp16 or fp32")


def configure_determinism(config: TrainConfig, device: torch.device) -> None:
    """CPU kernels are deterministic already; on CUDA exact resume needs deterministic
    kernels (slower), otherwise cuDNN may pick the fastest algorithm per shape."""
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- logs


class CsvLog:
    """A CSV file written row by row (flushed each time) that survives resumes: rows after the
    resumed step (logged after the checkpoint that is being resumed) are dropped first."""

    def __init__(self, path: Path, columns: list[str], keep_through_step: int) -> None:
        self.path = path
        self.columns = columns
        kept = []
        if keep_through_step > 0 and path.is_file():
            text = path.read_text(encoding="utf-8")
            if not text.endswith("\n"):  # a kill mid-write: the last row is a fragment
                text = text[: text.rfind("\n") + 1]
            rows = csv.DictReader(io.StringIO(text, newline=""))
            kept = [row for row in rows if _row_step(row) <= keep_through_step]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
        self.handle = path.open("a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.handle, fieldnames=columns, extrasaction="ignore")

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: _format_cell(v) for k, v in row.items()})
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _row_step(row: dict[str, str]) -> int:
    try:
        return int(row.get("step") or 0)
    except ValueError:
        return 0


def _format_cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def open_tensorboard(run_dir: Path, start_step: int, say) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        say(
            "note: log.tensorboard is on but the tensorboard package is not installed "
            "(pip install tensorboard); logging to log.csv only"
        )
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)


class Console:
    """Rank-0 messages: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO, *, enabled: bool, total: int, start: int) -> None:
        self.stream = stream
        self.enabled = enabled
        self.progress = None
        if enabled and stream.isatty():
            from rich.console import Console as RichConsole
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=RichConsole(file=stream),
            )
            self.task = self.progress.add_task("train", total=total, completed=start, status="")
            self.progress.start()

    @property
    def plain(self) -> bool:
        return self.enabled and self.progress is None

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            from rich.markup import escape

            self.progress.console.print(escape(message), soft_wrap=True)
        else:
            print(message, file=self.stream, flush=True)

    def advance(self, step: int, status: str | None) -> None:
        if self.progress is not None:
            fields = {"status": status} if status is not None else {}
            self.progress.update(self.task, completed=step, **fields)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# ----------------------------------------------------------------------------- stopping


class StopRequest:
    """Set by SIGINT/SIGTERM (a second Ctrl-C aborts at once), the time limit or ``stop_at``."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason == "interrupted" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = "interrupted"


# ----------------------------------------------------------------------------- the run


class Trainer:
    """Everything one training process holds, and the steps of a run."""

    def __init__(self, options: TrainOptions, stderr: TextIO) -> None:
        self.options = options
        self.config = load_config(options.config, options.overrides)
        self.run_dir = options.run_dir or RUNS_DIR / Path(options.config).stem
        self.distributed, self.device = start_distributed(self.config)
        self.stderr = stderr
        self.started = time.perf_counter()
        self.elapsed_before = 0.0
        self.step = 0
        self.stage: str | None = None  # the objective a staged model computes (setup)
        self.last_saved = -1
        self.config_changes: list[str] = []
        self.input_scores: dict[str, float] | None = None  # of the degraded val inputs
        self.init_notes: list[str] = []

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        config, distributed = self.config, self.distributed
        check_precision(config, self.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        configure_determinism(config, self.device)
        checkpoint = self.find_checkpoint()
        torch.manual_seed(config.seed)  # same initial weights on every rank (DDP checks)
        module = build_model(config).to(self.device)
        if checkpoint is None:
            for init in config.model.init:
                self.init_notes.append(load_init_weights(module, init))
        # A model with its own objective (DiffUIR's diffusion loss) names it as default_stage.
        self.stage = config.model.stage or getattr(module, "default_stage", None)
        if self.stage is not None:
            set_stage = getattr(module, "set_stage", None)
            if set_stage is None:
                raise ConfigError(
                    f"config key 'model.stage': {config.model.arch} is not trained in stages"
                )
            set_stage(self.stage)
        if config.model.experts:
            apply_expert_option(module, config, "experts", "train_only_experts")
        if config.model.expert_route != "nearest":
            apply_expert_option(module, config, "expert_route", "use_expert_route")
        if config.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.dataset = build_train_dataset(config, distributed.world)
        prepare = getattr(module, "prepare_training", None)
        if checkpoint is None and prepare is not None:  # e.g. UniRestorer fits its clusters
            prepare(self.dataset, config.seed)
        self.ema = (
            ModelEma(module, config.ema, config.ema_warmup) if config.ema is not None else None
        )
        self.optimizer = build_optimizer(module, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.loss = WeightedLoss(config.losses)
        use_loss = getattr(module, "use_restoration_loss", None)
        if use_loss is not None:  # a staged model's restoring stage takes the configured losses
            use_loss(self.loss)
        stage = self.stage
        self.loss_names = module.loss_names(stage) if stage is not None else self.loss.names
        rng_states = self.load_checkpoint(checkpoint) if checkpoint is not None else None
        self.model: nn.Module = module
        if distributed.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Conv backward returns 1x1 and depthwise weight grads whose strides differ from the
            # weights' only on size-1 dimensions (the same memory layout). DDP compares strides
            # strictly and warns on every job, though it copies each grad into its bucket anyway.
            warnings.filterwarnings(
                "ignore", message="Grad strides do not match bucket view strides"
            )
            self.model = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        loader = build_train_loader(
            self.dataset,
            config,
            start_step=self.step,
            rank=distributed.rank,
            world=distributed.world,
            pin_memory=self.device.type == "cuda",
        )
        self.sampler: StepBatchSampler = loader.batch_sampler
        self.batches: Iterator[dict[str, Any]] = iter(loader)
        self.val_set: list[ValImage] = load_val_set(config) if distributed.is_main else []
        self.console = Console(
            self.stderr,
            enabled=distributed.is_main and not self.options.quiet,
            total=config.iterations,
            start=self.step,
        )
        self.open_logs()
        self.describe(checkpoint)
        if rng_states is not None:
            restore_rng_states(rng_states)
        else:
            torch.manual_seed(config.seed + distributed.rank)

    def find_checkpoint(self) -> Checkpoint | None:
        resume = self.options.resume
        checkpoint = resolve_resume(self.run_dir, resume)
        existing = list_checkpoints(self.run_dir) if resume is None else []
        self.check_ranks_agree(checkpoint.step if checkpoint is not None else -1, len(existing))
        if existing:
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints (latest: step {existing[-1].step}); "
                "continue that run with --resume auto, or pick another --out"
            )
        return checkpoint

    def check_ranks_agree(self, *values: int) -> None:
        """Every rank must resume from the same checkpoint (else optimizer states would differ
        silently): true when RUN_DIR is on a filesystem that every node sees."""
        if not self.distributed.enabled:
            return
        local = torch.tensor([v for value in values for v in (value, -value)], device=self.device)
        highest = local.clone()
        torch.distributed.all_reduce(highest, op=torch.distributed.ReduceOp.MAX)
        if not torch.equal(local, highest):
            raise ConfigError(
                f"the processes see different checkpoints in {self.run_dir}; put the run folder "
                "on a filesystem that every node shares"
            )

    def load_checkpoint(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """Weights, EMA, optimizer, scheduler, scaler and step from a checkpoint; returns the
        RNG states (restored last, once nothing else draws random numbers)."""
        from restore_cli.models.loading import read_state_dict, strict_load

        state = load_training_state(checkpoint.state)
        arch = self.config.model.arch
        target = f"{arch} {self.config.model.config}"
        strict_load(self.module, read_state_dict(checkpoint.weights), checkpoint.weights, target)
        if self.ema is not None:
            if checkpoint.ema.is_file():
                ema_weights = read_state_dict(checkpoint.ema)
                strict_load(self.ema.module, ema_weights, checkpoint.ema, target)
            else:  # EMA switched on for a run that had none: start it from the weights
                self.ema = ModelEma(self.module, self.ema.decay, self.ema.warmup)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.last_saved = self.step
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.config_changes = config_changes(state.get("config", {}), self.config)
        return state["rng"]

    def open_logs(self) -> None:
        self.csv: CsvLog | None = None
        self.val_csv: CsvLog | None = None
        self.tensorboard = None
        if not self.distributed.is_main:
            return
        from restore_cli.metrics import Convention

        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.run_dir / CONFIG_NAME, dump_config(self.config).encode("utf-8"))
        val = self.config.val
        self.convention = Convention(val.color, val.crop_border)
        self.val_columns = [self.convention.column(metric) for metric in val.metrics]
        columns = ["step", "epoch", "loss", *self.loss_names, "lr", "seconds"]
        columns += [f"val_{column}" for column in self.val_columns]
        self.csv = CsvLog(self.run_dir / LOG_NAME, columns, self.step)
        if self.val_set:
            val_columns = ["step", "name", "types", *self.val_columns]
            self.val_csv = CsvLog(self.run_dir / VAL_LOG_NAME, val_columns, self.step)
        if self.config.log.tensorboard:
            self.tensorboard = open_tensorboard(self.run_dir, self.step, self.console.say)

    def describe(self, checkpoint: Checkpoint | None) -> None:
        config = self.config
        say = self.console.say
        count = parameter_count(self.module)
        world = f" x {self.distributed.world} processes" if self.distributed.enabled else ""
        say(
            f"training {config.model.arch} ({count / 1e6:.2f} M parameters) on "
            f"{self.device}{world}, {config.precision}, batch {config.batch}, crop {config.crop}; "
            f"{len(self.dataset)} items per epoch; run folder {self.run_dir}"
        )
        for note in self.init_notes:
            say(note)
        if checkpoint is not None:
            say(f"resuming from {checkpoint.state.name} (step {checkpoint.step})")
            if self.config_changes:
                changed = ", ".join(self.config_changes)
                say(f"note: config differs from the checkpoint's in {changed}")
        elif self.options.resume == "auto":
            say("no checkpoint yet; starting a new run")
        if not self.val_set and config.val_every:
            say("note: no validation set (data.val_pairs or data.val_clean); validation is off")

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        config = self.config
        stop = StopRequest()
        stop.install()
        window_loss = torch.zeros((), device=self.device)
        window_parts = {name: torch.zeros((), device=self.device) for name in self.loss_names}
        window_steps = 0
        lr = self.optimizer.param_groups[0]["lr"]
        status: str | None = None
        try:
            if self.step >= config.iterations:
                self.console.say(f"already at step {self.step} of {config.iterations}")
            while self.step < config.iterations:
                lr = self.optimizer.param_groups[0]["lr"]
                loss, parts = self.train_step(next(self.batches))
                self.step += 1
                window_loss += loss
                for name, value in parts.items():
                    window_parts[name] += value
                window_steps += 1
                last = self.step == config.iterations
                validate = bool(config.val_every) and (self.step % config.val_every == 0 or last)
                if self.step % config.log.every == 0 or validate or last:
                    losses = self.reduce_mean([window_loss, *window_parts.values()], window_steps)
                    status = f"loss {losses[0]:.4g} lr {lr:.2e}"
                    self.log_row(losses, lr, validate)
                    window_loss.zero_()
                    for value in window_parts.values():
                        value.zero_()
                    window_steps = 0
                self.console.advance(self.step, status)
                if self.step % config.checkpoint_every == 0 or last:
                    self.save()
                reason = self.stop_reason(stop)
                if reason is not None and not last:
                    return self.stop_early(reason)
            self.finish()
            return EXIT_OK
        finally:
            stop.uninstall()

    def close(self) -> None:
        """Stop the progress display and close the logs (whatever setup got to)."""
        for name in ("console", "csv", "val_csv", "tensorboard"):
            resource = getattr(self, name, None)
            if resource is not None:
                resource.close()
        self.batches = iter(())  # drops the loader iterator, which stops its worker processes
        if isinstance(getattr(self, "model", None), nn.parallel.DistributedDataParallel):
            self.model = self.module  # see stop_distributed

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lq = batch["lq"].to(self.device, non_blocking=True)
        gt = batch["gt"].to(self.device, non_blocking=True)
        if self.config.channels_last:
            lq = lq.contiguous(memory_format=torch.channels_last)
        stage = self.stage
        with self.autocast():
            if stage is not None:  # a staged model computes its own losses
                loss, parts = self.model(lq, stage=stage, batch=batch)
            else:
                pred = self.model(lq)
        if stage is None:
            loss, parts = self.loss(pred, gt)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.module, self.step + 1)  # self.step counts finished steps
        return loss.detach(), {name: value.detach() for name, value in parts.items()}

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = _AUTOCAST_DTYPES.get(self.config.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def reduce_mean(self, sums: list[torch.Tensor], steps: int) -> list[float]:
        """Mean over the logging window (and over ranks); fails loudly on a diverged loss."""
        values = torch.stack(sums) / max(steps, 1)
        if self.distributed.enabled:
            torch.distributed.all_reduce(values)
            values /= self.distributed.world
        means = values.tolist()
        if not math.isfinite(means[0]):
            raise RestoreCliError(
                f"training diverged: loss is {means[0]} at step {self.step}; lower optimizer.lr, "
                "set grad_clip, or train in fp32/bf16"
            )
        return means

    def seconds(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def log_row(self, losses: list[float], lr: float, validate: bool) -> None:
        metrics = self.validate() if validate else {}
        if validate:
            self.distributed.barrier()  # the other ranks wait while rank 0 validates
        if not self.distributed.is_main:
            return
        epoch = self.sampler.position(self.step - 1)[0]
        row: dict[str, Any] = {"step": self.step, "epoch": epoch, "loss": losses[0]}
        row |= dict(zip(self.loss_names, losses[1:], strict=True))
        row |= {"lr": lr, "seconds": round(self.seconds(), 2)}
        row |= {f"val_{column}": value for column, value in metrics.items()}
        assert self.csv is not None
        self.csv.write(row)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "epoch", "seconds"):
                    self.tensorboard.add_scalar(key.replace("_", "/", 1), value, self.step)
        if self.console.plain and self.step % self.config.log.print_every == 0:
            rate = self.step / max(self.seconds(), 1e-9)
            self.console.say(
                f"step {self.step}/{self.config.iterations}  loss {losses[0]:.4g}  lr {lr:.2e}  "
                f"{self.seconds():.0f} s ({rate:.2f} it/s overall)"
            )

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Mean metrics of the shipped weights (EMA when on) over the val set, rank 0 only."""
        if not self.distributed.is_main or not self.val_set:
            return {}
        started = time.perf_counter()
        network = self.ema.module if self.ema is not None else self.module
        engine = self.val_engine(network)
        totals = dict.fromkeys(self.val_columns, 0.0)
        first = self.input_scores is None
        input_totals = dict.fromkeys(self.val_columns, 0.0)
        metrics = tuple(self.config.val.metrics)
        try:
            for image in self.val_set:
                restored, _ = engine.restore_tensor(image.lq)
                try:
                    scores = self.score(restored.cpu(), image.gt, metrics)
                except ValueError as error:  # e.g. smaller than the SSIM window or the border
                    raise ConfigError(f"validation image {image.name}: {error}") from None
                row = {"step": self.step, "name": image.name, "types": image.types}
                for metric, column in zip(metrics, self.val_columns, strict=True):
                    value = float(scores[metric][0])
                    row[column] = value
                    totals[column] += value
                if first:
                    inputs = self.score(image.lq, image.gt, metrics)
                    for metric, column in zip(metrics, self.val_columns, strict=True):
                        input_totals[column] += float(inputs[metric][0])
                if self.val_csv is not None:
                    self.val_csv.write(row)
        finally:
            if network is self.module:  # the engine put it in eval mode
                network.train()
        count = len(self.val_set)
        means = {column: total / count for column, total in totals.items()}
        if first:
            self.input_scores = {c: t / count for c, t in input_totals.items()}
            shown = ", ".join(f"{c} {v:.4g}" for c, v in self.input_scores.items())
            self.console.say(f"val set: {count} images; degraded input: {shown}")
        shown = ", ".join(f"{c} {v:.4g}" for c, v in means.items())
        which = "EMA weights" if self.ema is not None else "weights"
        seconds = time.perf_counter() - started
        self.console.say(f"val step {self.step} ({which}): {shown} ({seconds:.1f} s)")
        return means

    def score(
        self, pred: torch.Tensor, gt: torch.Tensor, metrics: tuple[str, ...]
    ) -> dict[str, torch.Tensor]:
        """Per-image metrics with the configured convention (restore_cli.metrics)."""
        from restore_cli.metrics import psnr, ssim

        functions = {"psnr": psnr, "ssim": ssim}
        return {name: functions[name](pred, gt, self.convention) for name in metrics}

    def val_engine(self, network: nn.Module):
        from restore_cli.engine import Engine, EngineOptions
        from restore_cli.models.registry import LoadedModel, get_architecture

        spec = get_architecture(self.config.model.arch).spec(dict(self.config.model.config))
        precision = self.config.precision if self.device.type == "cuda" else "fp32"
        loaded = LoadedModel(name="validation", module=network, spec=spec)
        return Engine(loaded, EngineOptions(device=str(self.device), precision=precision))

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        if self.step == self.last_saved:
            return
        self.last_saved = self.step
        if self.distributed.is_main:
            checkpoint = save_checkpoint(
                self.run_dir,
                self.step,
                weights=self.module.state_dict(),
                ema_weights=self.ema.state_dict() if self.ema is not None else None,
                state=self.training_state(),
                metadata=self.metadata(ema=False),
            )
            prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
            if self.console.plain or self.step == self.config.iterations:
                self.console.say(f"checkpoint {checkpoint.weights}")
        self.distributed.barrier()

    def training_state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "step": self.step,
            "epoch": self.sampler.position(self.step)[0],
            "elapsed": self.seconds(),
            "world": self.distributed.world,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_states(),
            "config": self.config.to_dict(),
            "has_ema": self.ema is not None,
        }

    def metadata(self, *, ema: bool) -> dict[str, str]:
        model = self.config.model
        return weights_metadata(
            model.arch, model.config, self.step, ema=ema, train_config=self.config.to_dict()
        )

    def stop_reason(self, stop: StopRequest) -> str | None:
        """Why to stop after this step, agreed by every rank (checked each log interval under
        DDP, where it costs a collective, and every step otherwise)."""
        reason = stop.reason
        limit = self.options.max_minutes
        running = time.perf_counter() - self.started
        if reason is None and limit is not None and running > limit * 60:
            reason = "time limit"
        stop_at = self.options.stop_at
        if reason is None and stop_at is not None and self.step >= stop_at:
            reason = "stop_at"
        if not self.distributed.enabled:
            return reason
        if self.step % self.config.log.every:
            return None
        codes = ["interrupted", "time limit", "stop_at"]
        flag = torch.tensor(0 if reason is None else codes.index(reason) + 1, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return None if int(flag) == 0 else codes[int(flag) - 1]

    def stop_early(self, reason: str) -> int:
        self.save()
        self.console.say(
            f"stopped at step {self.step} ({reason}); continue with --resume auto "
            f"(run folder {self.run_dir})"
        )
        if reason == "interrupted":
            return EXIT_INTERRUPTED
        return EXIT_TIME_LIMIT if reason == "time limit" else EXIT_OK

    def finish(self) -> None:
        """The weights to ship (EMA when on) as RUN_DIR/final.safetensors."""
        if not self.distributed.is_main:
            return
        weights = self.ema.state_dict() if self.ema is not None else self.module.state_dict()
        data = weights_bytes(weights, self.metadata(ema=self.ema is not None))
        atomic_write_bytes(self.run_dir / FINAL_NAME, data)
        self.console.say(
            f"done: {self.step} iterations in {self.seconds():.0f} s; "
            f"weights {self.run_dir / FINAL_NAME}"
        )


def apply_expert_option(module: nn.Module, config: TrainConfig, key: str, method: str) -> None:
    """Hand ``model.<key>`` to the model's ``method`` (UniRestorer's expert options); the
    model's refusal becomes a config error naming the key."""
    apply = getattr(module, method, None)
    if apply is None:
        raise ConfigError(f"config key 'model.{key}': {config.model.arch} has no experts")
    try:
        apply(getattr(config.model, key))
    except ModelError as error:
        raise ConfigError(f"config key 'model.{key}': {error}") from None


def config_changes(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Keys of ``config`` that differ from a checkpoint's saved config. The saved one is parsed
    again first, so keys added to the schema since it was written (at their defaults) are not
    reported as changes."""
    with contextlib.suppress(ConfigError):  # a schema that no longer parses: compare as is
        saved = parse_config(saved).to_dict()
    return changed_keys(saved, config.to_dict())


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_keys(a, b, f"{name}.")
        elif a != b:
            changed.append(name)
    return changed


def run_training(options: TrainOptions, stderr: TextIO | None = None) -> TrainResult:
    """Like :func:`train`, and also returns the trained network (for tests and notebooks)."""
    trainer = Trainer(options, stderr if stderr is not None else sys.stderr)
    try:
        trainer.setup()
        code = trainer.run()
        return TrainResult(code, trainer.step, trainer.run_dir, trainer.module, trainer.ema)
    finally:
        trainer.close()
        stop_distributed(trainer.distributed)
