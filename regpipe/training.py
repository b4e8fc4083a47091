"""Training and finetuning of registration networks with the GradICON objective.

:func:`train` runs Adam on ``lam * L_gradicon + S(A o phi_AB, B) + S(B o phi_BA, A)``
(:func:`~regpipe.losses.gradicon_objective`, LNCC or squared LNCC), plus a soft-Dice term when
the pairs carry label maps and ``dice_weight > 0``, on pairs drawn from a
:class:`~regpipe.training_data.PairSource`.

A :class:`~regpipe.networks.ConditionalRegistrationNetwork` is trained on the condition of
each pair: its region and pair type (from the source) and the step's ``lam``, which is also
the GradICON weight of that step's loss (draw it from ``lam_range``).

A run lives in one folder:

``checkpoint.pt``
    Everything needed to continue: weights, optimiser state, step, torch's random state,
    options, elapsed time (plain tensors and numbers: read with ``weights_only=True``).
    Written atomically every ``checkpoint_every`` steps, at the end, when the wall-clock
    budget is spent, and on SIGINT/SIGTERM (the run stops after the current step).
``weights.pt`` / ``weights.md``
    The shippable weights file (:func:`~regpipe.networks.save_weights`) and its model card.
``weights-avg.pt`` / ``weights-avg.md``
    With ``average_from``: the mean of the snapshots taken every ``average_every`` steps from
    that step on (:class:`~regpipe.networks.WeightAverage`), updated at every checkpoint; the
    running sums travel in ``checkpoint.pt``, so a resumed run keeps averaging.
``log.csv``
    One row per step: losses, folds, seconds, the source of the pair.

Calling :func:`train` again on the same folder continues where the previous call stopped;
the sequence of pairs and the result are the same as one uninterrupted run with the same seed.

Pairs are drawn with a random generator of their own, seeded by ``(seed, step, index)``, so
they do not depend on what was drawn before: ``workers`` threads can draw the next steps' pairs
while the current step runs (on a GPU the data would otherwise be the bottleneck), and the run
is the same with any number of workers.

Example
-------
>>> from regpipe.networks import NetworkConfig, build_network
>>> from regpipe.training_data import RandomShapesSource
>>> config = NetworkConfig((33, 33, 33), 1, (4, 8, 8), (4, 8, 8))
>>> import tempfile
>>> state = train(build_network(config), RandomShapesSource(), tempfile.mkdtemp(),
...               TrainingOptions(steps=2, progress=False))
>>> state.step
2
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import math
import os
import platform
import signal
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from regpipe.errors import InputError, WeightsError
from regpipe.losses import SIMILARITIES, gradicon_objective, shared_label_one_hot
from regpipe.networks import (
    Condition,
    ConditionalRegistrationNetwork,
    RegistrationNetwork,
    WeightAverage,
    network_state,
    restore_network_state,
    save_weights,
    saved_config,
)
from regpipe.training_data import PairSource, TrainingPair

__all__ = ["PairStream", "TrainingOptions", "TrainingState", "train", "write_model_card"]

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "weights.pt"
CARD = "weights.md"
AVERAGE = "weights-avg.pt"
LOG = "log.csv"
LOG_FIELDS = ("step", "all", "similarity", "gradicon", "dice", "folds", "seconds", "region", "pair_type", "lam")


@dataclass
class TrainingOptions:
    """Settings of a training run.

    Attributes
    ----------
    steps
        Total optimisation steps of the run (a resumed run stops at the same total).
    batch_size
        Pairs per step.
    lr
        Adam learning rate.
    lam
        Weight of the GradICON term (uniGradICON uses 1.5).
    lam_range
        When set, ``(low, high)``: each step draws lam log-uniformly in this range, shared by
        the pairs of the step (for networks conditioned on the regularisation weight);
        ``lam`` is ignored.
    similarity
        ``"lncc"`` or ``"lncc2"`` (squared LNCC, uniGradICON's choice).
    lncc_sigma
        Gaussian window of the LNCC, in network-grid voxels (uniGradICON: 5 at 175^3, about
        7 mm on a brain; a 64^3 grid needs about 2 for the same window in mm).
    dice_weight
        Weight of the soft-Dice term on pairs that carry label maps (0: none).
    seed
        Seeds every pair's generator (with its step) and torch's default generator (GradICON
        noise).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    amp
        bfloat16 autocast on CUDA (ignored on the CPU).
    checkpoint_every
        Steps between checkpoints.
    budget_seconds
        Stop cleanly (checkpoint written) after this much wall-clock time in this call.
    trainable
        ``"all"`` parameters, or only the ``"controller"`` of a conditional network (its
        base network frozen: the conditions can only steer what the base already does, so
        it cannot forget).
    progress
        Show a progress bar with the running losses.
    average_from
        Keep the mean of the weights of every ``average_every``-th step from this step on
        (weight averaging; written as ``weights-avg.pt``). ``None``: no average.
    average_every
        Steps between the snapshots of the average.
    workers
        Threads drawing the next steps' pairs while a step runs; ``None`` picks
        ``min(8, CPUs - 1)`` on a GPU (the CPUs this process may use), where the network is faster than one thread's
        synthesis, and 0 on the CPU, where the step itself needs every core. The pairs, and
        so the run, are the same with any number.
    """

    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    lam: float = 1.5
    lam_range: tuple[float, float] | None = None
    similarity: str = "lncc"
    lncc_sigma: float = 5.0
    dice_weight: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    checkpoint_every: int = 100
    budget_seconds: float | None = None
    progress: bool = True
    trainable: str = "all"
    workers: int | None = None
    average_from: int | None = None
    average_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise InputError("steps must be >= 0, batch_size and checkpoint_every >= 1")
        if self.workers is not None and self.workers < 0:
            raise InputError(f"workers must be >= 0, got {self.workers}")
        if self.average_every < 1 or (self.average_from is not None and self.average_from < 0):
            raise InputError("average_every must be >= 1 and average_from >= 0")
        if not self.lr > 0 or self.lam < 0 or self.dice_weight < 0:
            raise InputError("lr must be > 0, lam and dice_weight >= 0")
        if self.trainable not in ("all", "controller"):
            raise InputError(f"trainable must be 'all' or 'controller', got {self.trainable!r}")
        if not self.lncc_sigma > 0:
            raise InputError(f"lncc_sigma must be > 0, got {self.lncc_sigma}")
        if self.similarity not in ("lncc", "lncc2"):
            raise InputError(f"similarity must be 'lncc' or 'lncc2', got {self.similarity!r}")
        if self.lam_range is not None:
            low, high = self.lam_range
            if not 0 < low <= high:
                raise InputError(f"lam_range must satisfy 0 < low <= high, got {self.lam_range}")
            self.lam_range = (float(low), float(high))

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["lam_range"] = list(self.lam_range) if self.lam_range else None
        return values


@dataclass
class TrainingState:
    """Where a run stands: ``step`` done, seconds spent over all calls, why it stopped, and
    how long this call's steps waited for their pairs (the data's share of the time)."""

    step: int
    elapsed_seconds: float
    stopped_by: str  # "steps", "budget" or "signal"
    folder: Path
    last_losses: dict[str, float]
    data_wait_seconds: float = 0.0  # of this call: time the steps waited for their pairs


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.raised = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def handler(signum: int, _frame: Any) -> None:
            self.raised = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _atomic_save(payload: Any, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def _batch(pairs: list[TrainingPair], device: torch.device) -> dict[str, Any]:
    moving = torch.cat([p.moving for p in pairs]).to(device)
    fixed = torch.cat([p.fixed for p in pairs]).to(device)
    labels = None
    if all(p.moving_labels is not None and p.fixed_labels is not None for p in pairs):
        labels = (
            torch.cat([p.moving_labels for p in pairs]).to(device),  # type: ignore[misc]
            torch.cat([p.fixed_labels for p in pairs]).to(device),  # type: ignore[misc]
        )
    return {"moving": moving, "fixed": fixed, "labels": labels}


def _generator(seed: int, step: int, item: int) -> torch.Generator:
    """The random generator of item ``item`` of step ``step``: pair ``item`` of the batch, or
    the step's lam for ``item = -1``."""
    digest = hashlib.sha256(f"regpipe-train:{seed}:{step}:{item}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _draw_lam(options: TrainingOptions, step: int) -> float:
    if options.lam_range is None:
        return options.lam
    low, high = options.lam_range
    u = float(torch.rand((), generator=_generator(options.seed, step, -1)))
    return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def _averaged(step: int, options: TrainingOptions) -> bool:
    """Whether the weights after ``step`` join the weight average."""
    start = options.average_from
    return start is not None and step >= start and step % options.average_every == 0


def _workers(options: TrainingOptions, device: torch.device) -> int:
    if options.workers is not None:
        return options.workers
    from regpipe.device import available_cpus

    return min(8, max(1, available_cpus() - 1)) if device.type == "cuda" else 0


class PairStream:
    """The pairs of each step of a run, drawn ``workers`` threads ahead (on demand with 0).

    Pair ``i`` of step ``s`` is drawn from ``source`` with a generator seeded by
    ``(options.seed, s, i)``: the same pairs with any number of workers. Sources only read
    their data and the generator they are given, so drawing in threads is safe; torch
    releases the GIL in the resampling and filtering that dominate a draw. ``waited`` adds up
    the seconds :meth:`pairs` spent drawing or waiting; :meth:`close` stops the threads.

    Example
    -------
    >>> from regpipe.training_data import RandomShapesSource
    >>> stream = PairStream(RandomShapesSource(), (16, 16, 16), TrainingOptions(steps=2), workers=2)
    >>> [p.moving.shape for p in stream.pairs(1)]
    [torch.Size([1, 1, 16, 16, 16])]
    >>> stream.close()
    """

    def __init__(self, source: PairSource, shape: tuple[int, int, int], options: TrainingOptions,
                 workers: int) -> None:
        self.source, self.shape, self.options = source, shape, options
        self.executor = (ThreadPoolExecutor(workers, thread_name_prefix="regpipe-pairs")
                         if workers else None)
        # enough steps in flight to keep every worker busy, and at least the next one
        self.ahead = max(2, math.ceil(2 * workers / options.batch_size))
        self.pending: deque[tuple[int, list[Future[TrainingPair]]]] = deque()
        self.waited = 0.0

    def _draw(self, step: int, item: int) -> TrainingPair:
        return self.source.draw(self.shape, _generator(self.options.seed, step, item))

    def pairs(self, step: int) -> list[TrainingPair]:
        """The pairs of ``step`` (steps are asked for in increasing order)."""
        started = time.perf_counter()
        try:
            if self.executor is None:
                return [self._draw(step, i) for i in range(self.options.batch_size)]
            while self.pending and self.pending[0][0] < step:
                self.pending.popleft()
            following = self.pending[-1][0] + 1 if self.pending else step
            while len(self.pending) < self.ahead and following <= max(step, self.options.steps):
                futures = [self.executor.submit(self._draw, following, i)
                           for i in range(self.options.batch_size)]
                self.pending.append((following, futures))
                following += 1
            _, futures = self.pending.popleft()
            return [future.result() for future in futures]
        finally:
            self.waited += time.perf_counter() - started

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def _conditioned(network: RegistrationNetwork, pairs: list[TrainingPair], lam: float):
    """Set each pair's condition (region, pair type, ``lam``) on a conditional network."""
    if not isinstance(network, ConditionalRegistrationNetwork):
        return contextlib.nullcontext()
    return network.conditioned([Condition(p.region, p.pair_type, lam) for p in pairs])


def _objective(network: RegistrationNetwork, batch: dict[str, Any], lam: float, options: TrainingOptions):
    labels = batch["labels"]
    use_dice = options.dice_weight > 0 and labels is not None
    if use_dice:
        try:
            shared_label_one_hot(*labels)
        except InputError:
            use_dice = False
    return gradicon_objective(
        network, batch["moving"], batch["fixed"],
        functools.partial(SIMILARITIES[options.similarity], sigma=options.lncc_sigma), lam,
        segmentations=labels if use_dice else None,
        dice_loss_weight=options.dice_weight if use_dice else 0.0,
    ), use_dice


def _resume(folder: Path, network: RegistrationNetwork, optimiser: torch.optim.Optimizer,
            average: WeightAverage | None) -> tuple[int, float]:
    path = folder / CHECKPOINT
    if not path.exists():
        return 0, 0.0
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"cannot read the training checkpoint {path}: {error}") from error
    expected = saved_config(network)
    if saved.get("config") != expected:
        raise InputError(
            f"{path} was trained with network configuration {saved.get('config')}, not "
            f"{expected}; use another output folder, or start from its "
            f"weights with --init {folder / WEIGHTS}"
        )
    restore_network_state(network, saved)
    optimiser.load_state_dict(saved["optimizer"])
    if average is not None and saved.get("average"):
        average.load_state_dict(saved["average"])
    torch.set_rng_state(saved["torch_rng"])
    return int(saved["step"]), float(saved["elapsed_seconds"])


def write_model_card(card: Mapping[str, Any], path: Path) -> Path:
    """Render a model card dictionary as Markdown next to the weights."""
    lines = [f"# Model card: {card.get('name', 'regpipe network')}", ""]
    for key, value in card.items():
        if isinstance(value, Mapping):
            lines.append(f"## {key}")
            lines.extend(f"- **{k}**: {v}" for k, v in value.items())
            lines.append("")
        else:
            lines.append(f"- **{key}**: {value}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _save(folder: Path, network: RegistrationNetwork, optimiser: torch.optim.Optimizer,
          step: int, elapsed: float, options: TrainingOptions, card: dict[str, Any],
          average: WeightAverage | None) -> None:
    _atomic_save({
        **network_state(network),
        "card": card,
        "optimizer": optimiser.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "step": step,
        "elapsed_seconds": elapsed,
        "options": options.to_dict(),
        "average": average.state_dict() if average is not None else None,
    }, folder / CHECKPOINT)
    temporary = folder / f".{WEIGHTS}.tmp"
    save_weights(network, temporary, card)
    os.replace(temporary, folder / WEIGHTS)
    write_model_card(card, folder / CARD)
    if average is not None and average.count:
        temporary = folder / f".{AVERAGE}.tmp"
        average.save(temporary, card)
        os.replace(temporary, folder / AVERAGE)
        write_model_card(average.card(card), (folder / AVERAGE).with_suffix(".md"))


def train(
    network: RegistrationNetwork,
    source: PairSource,
    folder: str | os.PathLike[str],
    options: TrainingOptions | None = None,
    card: Mapping[str, Any] | None = None,
) -> TrainingState:
    """Train ``network`` on pairs from ``source``, checkpointing into ``folder``.

    Parameters
    ----------
    network
        The network to train (its current weights are the start unless ``folder`` holds a
        checkpoint of the same configuration, which is resumed).
    source
        Where pairs come from (see :mod:`regpipe.training_data`).
    folder
        Run folder (created); see the module docstring for its files.
    options
        :class:`TrainingOptions`.
    card
        Extra model-card entries (name, data description...); the training record (steps,
        wall time, hardware, options) is added automatically.

    Returns
    -------
    :class:`TrainingState`.
    """
    from tqdm.auto import tqdm

    from regpipe.device import select_device

    options = options or TrainingOptions()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = select_device(options.device)
    network.to(device).train()
    torch.manual_seed(options.seed)
    optimiser = torch.optim.Adam(_trainable_parameters(network, options.trainable), lr=options.lr)
    average = WeightAverage() if options.average_from is not None else None
    step, elapsed_before = _resume(folder, network, optimiser, average)
    shape = network.config.grid_shape
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if options.amp and device.type == "cuda" else contextlib.nullcontext()
    )
    log_path = folder / LOG
    new_log = not log_path.exists()
    started = time.monotonic()
    stop = _StopFlag()
    stopped_by = "steps"
    last: dict[str, float] = {}
    base_card = dict(card or {})

    def current_card() -> dict[str, Any]:
        record = dict(base_card)
        record["training"] = {
            **dict(base_card.get("training", {})),
            "steps": step,
            "wall_time_hours": round((elapsed_before + time.monotonic() - started) / 3600, 3),
            "hardware": _hardware(device),
            "source": getattr(source, "name", type(source).__name__),
            "options": {k: v for k, v in options.to_dict().items() if k not in ("progress",)},
        }
        return record

    bar = tqdm(total=options.steps, initial=step, disable=not options.progress, desc="training",
               unit="step", dynamic_ncols=True)
    stream = PairStream(source, shape, options, _workers(options, device))
    with open(log_path, "a", newline="", encoding="utf-8") as log_file, stop.installed(), \
            contextlib.closing(stream):
        writer = csv.writer(log_file)
        if new_log:
            writer.writerow(LOG_FIELDS)
        while step < options.steps:
            if stop.raised:
                stopped_by = "signal"
                break
            if options.budget_seconds is not None and time.monotonic() - started >= options.budget_seconds:
                stopped_by = "budget"
                break
            t0 = time.perf_counter()
            pairs = stream.pairs(step + 1)
            lam = _draw_lam(options, step + 1)
            batch = _batch(pairs, device)
            optimiser.zero_grad(set_to_none=True)
            with autocast, _conditioned(network, pairs, lam):
                terms, used_dice = _objective(network, batch, lam, options)
            loss = terms.all_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {loss.item()} at step {step + 1}; lower --lr or resume "
                    f"from the last checkpoint in {folder}"
                )
            loss.backward()
            optimiser.step()
            step += 1
            if average is not None and _averaged(step, options):
                average.add(network, step)
            values = {k: float(v.detach()) for k, v in terms._asdict().items()}
            dice = values["all_loss"] - lam * values["inverse_consistency_loss"] - values["similarity_loss"]
            last = {
                "all": values["all_loss"], "similarity": values["similarity_loss"],
                "gradicon": values["inverse_consistency_loss"], "dice": dice if used_dice else 0.0,
                "folds": values["flips"],
            }
            writer.writerow([step, *(f"{last[k]:.6g}" for k in ("all", "similarity", "gradicon", "dice", "folds")),
                             f"{time.perf_counter() - t0:.3f}", pairs[0].region,
                             pairs[0].pair_type, f"{lam:.4g}"])
            bar.update(1)
            bar.set_postfix(loss=f"{last['all']:.4f}", sim=f"{last['similarity']:.4f}",
                            icon=f"{last['gradicon']:.4f}")
            if step % options.checkpoint_every == 0:
                log_file.flush()
                _save(folder, network, optimiser, step,
                      elapsed_before + time.monotonic() - started, options, current_card(), average)
    bar.close()
    elapsed = elapsed_before + time.monotonic() - started
    _save(folder, network, optimiser, step, elapsed, options, current_card(), average)
    network.requires_grad_(True)
    network.eval()
    return TrainingState(step, elapsed, stopped_by, folder, last, stream.waited)


def _trainable_parameters(network: RegistrationNetwork, trainable: str) -> list[torch.nn.Parameter]:
    """The parameters to optimise; with ``"controller"`` every other one is frozen, and the
    base network's batch-norm statistics too (its layers run as at inference)."""
    if trainable == "all":
        return list(network.parameters())
    if not isinstance(network, ConditionalRegistrationNetwork):
        raise InputError("training the controller only needs a conditional network")
    chosen = {id(p) for p in network.controller.parameters()}
    for parameter in network.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return list(network.controller.parameters())


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
