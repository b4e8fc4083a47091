"""A training run's folder: its checkpoint, weights, model cards and log, and its stop signals.

``checkpoint.pt``
    Everything needed to continue: weights, optimiser state, step, torch's random state,
    options, elapsed time, the running weight average (plain tensors and numbers: read with
    ``weights_only=True``). Written atomically.
``weights.pt`` / ``weights.md``
    The shippable weights file (:func:`~regpipe.networks.save_weights`) and its model card.
``weights-avg.pt`` / ``weights-avg.md``
    The weight average, when the run keeps one (:class:`~regpipe.networks.WeightAverage`).
``log.csv``
    One row per step (:data:`LOG_FIELDS`).

The pairs need no state here: each is seeded by its step (:mod:`regpipe.pair_stream`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from regpipe.atomic import atomic_write, atomic_write_text
from regpipe.errors import InputError, WeightsError
from regpipe.networks import (
    RegistrationNetwork,
    WeightAverage,
    network_state,
    restore_network_state,
    save_weights,
    saved_config,
)

__all__ = ["LOG_FIELDS", "ProgressLog", "StopFlag", "resume_run", "save_run", "write_model_card"]

LOGGER = logging.getLogger("regpipe.training")

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "weights.pt"
CARD = "weights.md"
AVERAGE = "weights-avg.pt"
LOG = "log.csv"
LOG_FIELDS = ("step", "all", "similarity", "gradicon", "dice", "folds", "seconds", "region",
              "pair_type", "lam")


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.raised = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
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


class ProgressLog:
    """Without a progress bar (batch jobs, SLURM logs), one log line per checkpoint: the mean
    losses since the previous line, the speed and the time still to go."""

    KEYS = ("all", "similarity", "gradicon", "dice")

    def __init__(self, total_steps: int, enabled: bool) -> None:
        self.total_steps, self.enabled = total_steps, enabled
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.count, self.since = 0, time.monotonic()

    def add(self, losses: Mapping[str, float]) -> None:
        for key in self.KEYS:
            self.sums[key] += losses[key]
        self.count += 1

    def report(self, step: int, budget_left: float | None) -> None:
        """Log the line for ``step`` (``budget_left``: seconds of the wall-clock budget)."""
        if not self.enabled or not self.count:
            return
        per_step = (time.monotonic() - self.since) / self.count
        to_go = (self.total_steps - step) * per_step
        if budget_left is not None:
            to_go = min(to_go, max(budget_left, 0.0))
        mean = {key: value / self.count for key, value in self.sums.items()}
        LOGGER.info("step %d/%d: loss %.4f (similarity %.4f, GradICON %.4f, Dice %.4f; mean of "
                    "%d steps), %.2f s/step, %s to go", step, self.total_steps, mean["all"],
                    mean["similarity"], mean["gradicon"], mean["dice"], self.count, per_step,
                    f"{to_go / 60:.0f} min" if to_go < 3600 else f"{to_go / 3600:.1f} h")
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.count, self.since = 0, time.monotonic()


def _atomic_save(payload: Any, path: Path) -> None:
    try:
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except RuntimeError as error:  # torch's writer reports a full disk as a RuntimeError
        free = shutil.disk_usage(path.parent).free
        if free < (64 << 20):
            raise OSError(errno.ENOSPC, f"no space left on the device of {path.parent} "
                          f"({free >> 20} MB free)", str(path)) from None
        raise OSError(errno.EIO, f"cannot write {path}: {str(error).splitlines()[0]}",
                      str(path)) from None


#: Options a resumed run must keep: they define what is trained (the others, such as the
#: number of steps, the budget, the device, the workers, weight averaging and the learning
#: rate, may change).
FIXED_OPTIONS = ("batch_size", "lam", "lam_range", "similarity", "lncc_sigma", "dice_weight",
                 "dice_labels", "seed", "trainable")
#: Recipe entries (in the card's ``training.recipe``) a resumed run must keep.
FIXED_RECIPE = ("sources", "init", "conditional", "data_root")
#: Finetuning selections (the card's ``finetuning``) a resumed finetuning run must keep.
FIXED_FINETUNING = ("dataset_path", "suffix", "pair_type", "participant_label",
                    "session_label", "bids_filters", "labels", "affine_init", "region",
                    "preprocessing", "images", "pairs_inter", "pairs_intra")
#: The dataset's counts among them: known only once the images are read.
_COUNTS = ("images", "pairs_inter", "pairs_intra")
#: What a finetuning record without an entry had (runs from before the entry existed).
_FINETUNING_BEFORE = {"preprocessing": {"bias_correct": False, "masked_images": 0}}


def finetuning_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The :data:`FIXED_FINETUNING` entries that differ between two finetuning records."""
    changes = []
    for key in FIXED_FINETUNING if old and new else ():
        if key in _COUNTS and key not in new:
            continue  # the early check, before the images are read: no counts yet
        before = old.get(key, _FINETUNING_BEFORE.get(key))
        if before != new.get(key):
            changes.append(f"{key} {before!r} -> {new.get(key)!r}"
                           + (" (the dataset changed: its pairs would not be the ones drawn "
                              "so far)" if key in ("images", "pairs_inter", "pairs_intra")
                              else ""))
    return changes


def _changes(saved: Mapping[str, Any], options: Mapping[str, Any] | None,
             card: Mapping[str, Any] | None) -> list[str]:
    changes = []
    before = saved.get("options") or {}
    now = options or {}
    for key in FIXED_OPTIONS:
        if key in before and key in now and before[key] != now[key]:
            changes.append(f"{key} {before[key]!r} -> {now[key]!r}")
    old = ((saved.get("card") or {}).get("training") or {}).get("recipe") or {}
    new = ((card or {}).get("training") or {}).get("recipe") or {}
    for key in FIXED_RECIPE if new else ():
        if key == "init" and new.get(key) is None:
            continue  # resuming without --init: the checkpoint's weights are the start anyway
        if key == "init" and old.get("init_sha256") and new.get("init_sha256"):
            if old["init_sha256"] != new["init_sha256"]:  # the same file may be named otherwise
                changes.append(f"init {old.get(key)!r} -> {new.get(key)!r} (another file)")
            continue
        if key == "data_root" and (not Path(str(old.get(key, ""))).is_absolute()
                                   or not _relative_sources(new.get("sources"))):
            continue  # recorded before roots were absolute, or no source path depends on it
        if old.get(key) != new.get(key):
            changes.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}"
                           if key != "sources" else "the data sources")
    changes += finetuning_changes((saved.get("card") or {}).get("finetuning") or {},
                                  (card or {}).get("finetuning") or {})
    return changes


def _relative_sources(sources: Any) -> bool:
    """Whether any recipe source names its files relative to the data root."""
    for source in sources if isinstance(sources, list) else ():
        if not isinstance(source, Mapping):
            continue
        paths = source.get("paths") or []
        names = [paths] if isinstance(paths, str) else list(paths)
        if source.get("csv"):
            names.append(source["csv"])
        if any(not Path(str(name)).expanduser().is_absolute() for name in names):
            return True
    return False


def resume_run(folder: Path, network: RegistrationNetwork, optimiser: torch.optim.Optimizer,
               average: WeightAverage | None, options: Mapping[str, Any] | None = None,
               card: Mapping[str, Any] | None = None) -> tuple[int, float]:
    """Restore the run in ``folder`` into ``network``, ``optimiser``, ``average`` and torch's
    random state; return its step and elapsed seconds (``0, 0.0`` for a new run).

    With ``options`` (:meth:`TrainingOptions.to_dict`) and ``card`` (its ``training.recipe``),
    a run whose :data:`FIXED_OPTIONS` or :data:`FIXED_RECIPE` differ is refused
    (:class:`InputError` naming them); a different ``lr`` is applied to the restored
    optimiser (the checkpoint's would otherwise win silently).
    """
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
    changes = _changes(saved, options, card)
    if changes:
        raise InputError(
            f"{folder} holds a run with other settings ({'; '.join(changes)}); resume it with "
            f"the same ones (--steps, --budget, --lr, --device, --workers may change) or use "
            f"another output folder"
        )
    restore_network_state(network, saved)
    try:
        optimiser.load_state_dict(saved["optimizer"])
    except ValueError as error:  # other parameter groups: another --trainable
        raise InputError(f"{path} was trained with other trainable parameters ({error})"
                         ) from None
    if options is not None and "lr" in options:
        for group in optimiser.param_groups:
            if group["lr"] != options["lr"]:
                LOGGER.info("learning rate %g -> %g from this step on", group["lr"],
                            options["lr"])
                group["lr"] = options["lr"]
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
    return atomic_write_text(path, "\n".join(lines) + "\n")


def save_run(folder: Path, network: RegistrationNetwork, optimiser: torch.optim.Optimizer, *,
             step: int, elapsed: float, options: Mapping[str, Any], card: dict[str, Any],
             average: WeightAverage | None) -> None:
    """Write the checkpoint, the weights and their card (and the average's) atomically."""
    _atomic_save({
        **network_state(network),
        "card": card,
        "optimizer": optimiser.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "step": step,
        "elapsed_seconds": elapsed,
        "options": dict(options),
        "average": average.state_dict() if average is not None else None,
    }, folder / CHECKPOINT)
    save_weights(network, folder / WEIGHTS, card)
    write_model_card(card, folder / CARD)
    if average is not None and average.count:
        average.save(folder / AVERAGE, card)
        write_model_card(average.card(card), (folder / AVERAGE).with_suffix(".md"))
