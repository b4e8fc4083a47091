"""Training and finetuning of registration networks with the GradICON objective.

:func:`train` runs Adam on ``lam * L_gradicon + S(A o phi_AB, B) + S(B o phi_BA, A)``
(:func:`~regpipe.losses.gradicon_objective`, LNCC or squared LNCC), plus a soft-Dice term when
the pairs carry label maps and ``dice_weight > 0``, on pairs drawn from a
:class:`~regpipe.training_data.PairSource`.

A :class:`~regpipe.networks.ConditionalRegistrationNetwork` is trained on the condition of
each pair: its region and pair type (from the source) and the step's ``lam``, which is also
the GradICON weight of that step's loss (draw it from ``lam_range``).

A run lives in one folder (:mod:`regpipe.run_folder`): ``checkpoint.pt`` (written atomically
every ``checkpoint_every`` steps, at the end, when the wall-clock budget is spent, and on
SIGINT/SIGTERM after the current step), ``weights.pt`` + ``weights.md``, with
``average_from`` the weight average ``weights-avg.pt`` + ``weights-avg.md``, and ``log.csv``.

Calling :func:`train` again on the same folder continues where the previous call stopped;
the sequence of pairs and the result are the same as one uninterrupted run with the same seed.

Each pair has a random generator of its own, seeded by ``(seed, step, index)``
(:mod:`regpipe.pair_stream`): ``workers`` threads can draw the next steps' pairs while the
current step runs (on a GPU the data would otherwise be the bottleneck), and the run is the
same with any number of workers.

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
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regpipe.errors import InputError, TrainingError
from regpipe.losses import SIMILARITIES, gradicon_objective, shared_label_one_hot
from regpipe.networks import (
    Condition,
    ConditionalRegistrationNetwork,
    RegistrationNetwork,
    WeightAverage,
)
from regpipe.pair_stream import PairStream, default_workers, pair_generator
from regpipe.run_folder import (
    CHECKPOINT,
    LOG,
    LOG_FIELDS,
    ProgressLog,
    StopFlag,
    resume_run,
    save_run,
    write_model_card,
)
from regpipe.training_data import PairSource, TrainingPair

__all__ = ["TrainingOptions", "TrainingState", "train", "write_model_card"]

LOGGER = logging.getLogger(__name__)
#: The loss columns of ``log.csv`` (after ``step``), in the order of :data:`LOG_FIELDS`.
_LOSS_COLUMNS = LOG_FIELDS[1:6]


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
    dice_labels
        Score at most this many of the labels a step's maps share, drawn at random per step
        (the rest count as background that step); ``None``: all. Warping a one-hot map costs
        as much per label as the rest of the step per image, so on a brain label map (about
        35 shared labels) the Dice term is half of a step's time; drawn labels keep the term's
        expectation and cut its cost.
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
        ``min(8, CPUs - 1)`` on a GPU (the CPUs this process may use), where the network is
        faster than one thread's synthesis, and 0 on the CPU, where the step itself needs every
        core. The pairs, and so the run, are the same with any number.
    """

    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    lam: float = 1.5
    lam_range: tuple[float, float] | None = None
    similarity: str = "lncc"
    lncc_sigma: float = 5.0
    dice_weight: float = 0.0
    dice_labels: int | None = None
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
        if self.dice_labels is not None and self.dice_labels < 1:
            raise InputError(f"dice_labels must be >= 1 (or None for all), got {self.dice_labels}")
        if not self.lncc_sigma > 0:
            raise InputError(f"lncc_sigma must be > 0, got {self.lncc_sigma}")
        if self.similarity not in ("lncc", "lncc2"):
            raise InputError(f"similarity must be 'lncc' or 'lncc2', got {self.similarity!r}")
        if self.lam_range is not None:
            low, high = self.lam_range
            if not 0 < low <= high < math.inf:
                raise InputError("lam_range must satisfy 0 < low <= high (finite), "
                                 f"got {self.lam_range}")
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

    def summary(self) -> dict[str, Any]:
        """The run as the one JSON line ``regpipe-train`` and ``regpipe-finetune`` print."""
        return {"step": self.step, "stopped_by": self.stopped_by,
                "elapsed_seconds": round(self.elapsed_seconds, 1),
                "data_wait_seconds": round(self.data_wait_seconds, 1), **self.last_losses}


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


def _draw_lam(options: TrainingOptions, step: int) -> float:
    if options.lam_range is None:
        return options.lam
    low, high = options.lam_range
    u = float(torch.rand((), generator=pair_generator(options.seed, step, -1)))
    return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def _draw_labels(labels: tuple[torch.Tensor, torch.Tensor], most: int | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels`` with all but ``most`` randomly drawn shared non-zero labels set to 0."""
    moving, fixed = labels
    shared = np.intersect1d(torch.unique(moving).cpu().numpy(), torch.unique(fixed).cpu().numpy())
    shared = shared[shared != 0]
    if most is None or shared.size <= most:
        return labels
    order = torch.randperm(shared.size, generator=generator)[:most].numpy()
    keep = torch.as_tensor(shared[order], device=moving.device)
    return (torch.where(torch.isin(moving, keep), moving, 0),
            torch.where(torch.isin(fixed, keep), fixed, 0))


def _averaged(step: int, options: TrainingOptions) -> bool:
    """Whether the weights after ``step`` join the weight average."""
    start = options.average_from
    return start is not None and step >= start and step % options.average_every == 0


def _conditioned(network: RegistrationNetwork, pairs: list[TrainingPair], lam: float):
    """Set each pair's condition (region, pair type, ``lam``) on a conditional network."""
    if not isinstance(network, ConditionalRegistrationNetwork):
        return contextlib.nullcontext()
    return network.conditioned([Condition(p.region, p.pair_type, lam) for p in pairs])


def _objective(
    network: RegistrationNetwork, batch: dict[str, Any], lam: float, options: TrainingOptions
):
    labels = batch["labels"]
    use_dice = options.dice_weight > 0 and labels is not None
    if use_dice:
        try:
            shared_label_one_hot(*labels)
        except InputError:
            use_dice = False
    # "lncc" and "lncc2" (the similarities TrainingOptions allows) take a ``sigma`` keyword
    measure: Callable[..., torch.Tensor] = SIMILARITIES[options.similarity]
    return gradicon_objective(
        network, batch["moving"], batch["fixed"],
        functools.partial(measure, sigma=options.lncc_sigma), lam,
        segmentations=labels if use_dice else None,
        dice_loss_weight=options.dice_weight if use_dice else 0.0,
    ), use_dice


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
    from regpipe.device import select_device

    options = options or TrainingOptions()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        return _train(network, source, folder, options, card, select_device(options.device))


#: Run folders this process holds the lock of (``regpipe-finetune`` takes it before it
#: prepares images, then :func:`train` runs inside it).
_HELD: set[Path] = set()


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold ``folder/.lock`` (``fcntl.flock``) for the run: a second run in the same folder
    would interleave its log rows and checkpoints with this one's (:class:`InputError` naming
    the holder's process). Re-entrant within a process; on a file system without ``flock``
    (Lustre without the flock mount option, NFS with ``nolock``) the run goes on unlocked,
    with a warning."""
    import errno
    import fcntl

    folder = Path(folder).absolute()
    if folder in _HELD:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+", encoding="utf-8")  # held until the run ends
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                LOGGER.warning("cannot lock %s (%s): make sure no other run uses this folder",
                               folder, error.strerror)
                locked = False
            else:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise InputError(f"another run (process {holder}) is training in {folder}; "
                                 "wait for it or use another folder") from None
        if locked:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        _HELD.add(folder)
        try:
            yield
        finally:
            _HELD.discard(folder)
    finally:
        handle.close()


def _train(network: RegistrationNetwork, source: PairSource, folder: Path,
           options: TrainingOptions, card: Mapping[str, Any] | None,
           device: torch.device) -> TrainingState:
    """:func:`train` with the folder made and locked."""
    from tqdm.auto import tqdm

    network.to(device).train()
    torch.manual_seed(options.seed)
    optimiser = torch.optim.Adam(_trainable_parameters(network, options.trainable), lr=options.lr)
    # always restored: a resumed run without averaging keeps (does not extend) the average an
    # earlier part of the run built
    average = WeightAverage()
    step, elapsed_before = resume_run(folder, network, optimiser, average,
                                      options.to_dict(), card)
    if options.average_from is None and average.count:
        LOGGER.warning("the run's weight average (%d snapshots) is kept but not extended: give "
                       "--average-from to extend it", average.count)
    if step and step >= options.steps:
        LOGGER.warning("the run in %s is already at step %d of --steps %d: nothing to train "
                       "(give a larger --steps to continue it)", folder, step, options.steps)
    shape = network.config.grid_shape
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if options.amp and device.type == "cuda" else contextlib.nullcontext()
    )
    log_path = folder / LOG
    _cut_log(log_path, step)
    new_log = not log_path.exists()
    started = time.monotonic()
    stop = StopFlag()
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
            "options": {**{k: v for k, v in options.to_dict().items() if k != "progress"},
                        "amp": options.amp and device.type == "cuda"},  # what ran
        }
        return record

    bar = tqdm(total=options.steps, initial=step, disable=not options.progress, desc="training",
               unit="step", dynamic_ncols=True)
    workers = options.workers if options.workers is not None else default_workers(device)
    stream = PairStream(source, shape, seed=options.seed, batch_size=options.batch_size,
                        workers=workers, last_step=options.steps)
    progress_log = ProgressLog(options.steps, enabled=not options.progress)
    LOGGER.info("%s at step %d of %d on %s: batch %d, %d thread(s) drawing pairs ahead%s",
                "continuing" if step else "starting", step, options.steps, _hardware(device),
                options.batch_size, workers,
                "" if options.average_from is None else
                f", averaging weights every {options.average_every} steps from step "
                f"{options.average_from}")
    with open(log_path, "a", newline="", encoding="utf-8") as log_file, stop.installed(), \
            contextlib.closing(stream):
        writer = csv.writer(log_file)
        if new_log:
            writer.writerow(LOG_FIELDS)
        while step < options.steps:
            if stop.raised:
                stopped_by = "signal"
                break
            if (options.budget_seconds is not None
                    and time.monotonic() - started >= options.budget_seconds):
                stopped_by = "budget"
                break
            t0 = time.perf_counter()
            pairs = stream.pairs(step + 1)
            lam = _draw_lam(options, step + 1)
            batch = _batch(pairs, device)
            if batch["labels"] is not None and options.dice_labels is not None:
                batch["labels"] = _draw_labels(batch["labels"], options.dice_labels,
                                               pair_generator(options.seed, step + 1, -2))
            optimiser.zero_grad(set_to_none=True)
            with autocast, _conditioned(network, pairs, lam):
                terms, used_dice = _objective(network, batch, lam, options)
            loss = terms.all_loss
            if not torch.isfinite(loss):
                advice = (f"resume from the last checkpoint in {folder} with a lower --lr"
                          if (folder / CHECKPOINT).exists() else "start again with a lower --lr")
                raise TrainingError(f"the loss became {loss.item()} at step {step + 1}; {advice}")
            loss.backward()
            optimiser.step()
            step += 1
            if average is not None and _averaged(step, options):
                average.add(network, step)
            values = {k: float(v.detach()) for k, v in terms._asdict().items()}
            dice = (values["all_loss"] - lam * values["inverse_consistency_loss"]
                    - values["similarity_loss"])
            last = {
                "all": values["all_loss"], "similarity": values["similarity_loss"],
                "gradicon": values["inverse_consistency_loss"], "dice": dice if used_dice else 0.0,
                "folds": values["flips"],
            }
            writer.writerow([step, *(f"{last[k]:.6g}" for k in _LOSS_COLUMNS),
                             f"{time.perf_counter() - t0:.3f}", pairs[0].region,
                             pairs[0].pair_type, f"{lam:.4g}"])
            progress_log.add(last)
            bar.update(1)
            bar.set_postfix(loss=f"{last['all']:.4f}", sim=f"{last['similarity']:.4f}",
                            icon=f"{last['gradicon']:.4f}")
            if step % options.checkpoint_every == 0:
                log_file.flush()
                save_run(folder, network, optimiser, step=step, card=current_card(),
                         average=average, elapsed=elapsed_before + time.monotonic() - started,
                         options=options.to_dict())
                budget = options.budget_seconds
                remaining = None if budget is None else budget - (time.monotonic() - started)
                progress_log.report(step, remaining)
    bar.close()
    spent = time.monotonic() - started
    starved = stream.waited > 0.2 * spent
    LOGGER.info("waited %.0f s of %.0f s for training pairs%s", stream.waited, spent,
                "; more workers would keep the device busier" if starved else "")
    elapsed = elapsed_before + spent
    with stop.installed():  # a second Ctrl-C must not cut the last checkpoint in half
        save_run(folder, network, optimiser, step=step, elapsed=elapsed,
                 options=options.to_dict(), card=current_card(), average=average)
    network.requires_grad_(True)
    network.eval()
    return TrainingState(step, elapsed, stopped_by, folder, last, stream.waited)


def _cut_log(path: Path, step: int) -> None:
    """Drop the rows of steps after ``step`` (the checkpoint a run resumes from): they were
    logged after the last checkpoint of a run that then crashed or was killed, and are
    trained again."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if not lines:
        return
    fields = lines[0].count(",")

    def complete_and_before(line: str) -> bool:  # a row cut off by a kill is not complete
        first = line.split(",", 1)[0]
        return (line.endswith("\n") and line.count(",") == fields and first.isdigit()
                and int(first) <= step)

    kept = lines[:1] + [line for line in lines[1:] if complete_and_before(line)]
    if len(kept) != len(lines):
        from regpipe.atomic import atomic_write_text

        LOGGER.info("%s: dropped %d row(s) logged after step %d, the checkpoint resumed from",
                    path, len(lines) - len(kept), step)
        atomic_write_text(path, "".join(kept))


def _trainable_parameters(
    network: RegistrationNetwork, trainable: str
) -> list[torch.nn.Parameter]:
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
