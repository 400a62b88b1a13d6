"""Optuna studies: one per kernel family, (N, K) and M bucket, stored in SQLite.

Each study searches ``ShapeSpace.candidates()`` (params ``kernel`` and, for split-K kernels,
``split_k``). The generator's default choice is enqueued first, so the default's time is always
measured and the winner can never be a candidate slower than it. Small spaces are searched
exhaustively (``BruteForceSampler``), larger ones with TPE. A candidate the measurement rejects
(wrong output, kernel check, launch error, far too slow) becomes a PRUNED trial whose
``reason`` user attribute says why; the study goes on. A broken CUDA context (illegal address)
stops the run cleanly; rerunning resumes from the database.

Studies live in one SQLite file (``sqlite:///PATH``), so a second run adds trials to the same
studies and ``optuna-dashboard sqlite:///PATH`` shows them. ``time_budget_s`` bounds the whole
run: each study gets an equal share of what is left, checked between trials.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from generator.configs import KernelConfig

from .space import Candidate, ShapeSpace

# measure(candidate, best_us_so_far) -> {"median_us": float, ...}; raises on a bad candidate
# (objective.CandidateRejected carries a reason and whether the CUDA context is lost).
Measure = Callable[[Candidate, "float | None"], dict]
MeasureFactory = Callable[["StudyTask"], Measure]


@dataclass(frozen=True)
class StudyTask:
    space: ShapeSpace
    m: int                 # the M the bucket is measured at (its upper bound)
    default: Candidate     # the generator's untuned choice at this M
    layers: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.space.study_name(self.m)


@dataclass
class StudyOutcome:
    task: StudyTask
    best: Candidate | None = None
    best_us: float | None = None
    default_us: float | None = None
    complete: int = 0
    pruned: int = 0
    new_trials: int = 0
    skipped: str | None = None          # why the study did not run (budget, nothing compiled, ...)
    fatal: str | None = None            # the measurement broke the process (CUDA context lost)
    pruned_reasons: dict[str, str] = field(default_factory=dict)


def storage_url(path: str | Path) -> str:
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def candidate_params(c: Candidate) -> dict:
    return {"kernel": c.kernel, "split_k": c.split_k} if KernelConfig.from_name(c.kernel).split_k \
        else {"kernel": c.kernel}


def trial_candidate(params: dict) -> Candidate:
    return Candidate(params["kernel"], int(params.get("split_k", 1)))


def suggest(trial: optuna.Trial, space: ShapeSpace) -> Candidate:
    kernel = trial.suggest_categorical("kernel", list(space.compiled))
    split = 1
    if KernelConfig.from_name(kernel).split_k:
        split = trial.suggest_categorical("split_k", [1, *space.split_factors])
    return Candidate(kernel, split)


def make_sampler(space_size: int, trials: int, seed: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if space_size <= trials:
            return optuna.samplers.BruteForceSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)


def summarize(study: optuna.Study, task: StudyTask, outcome: StudyOutcome) -> StudyOutcome:
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    for t in finished:
        if t.state == TrialState.PRUNED:
            outcome.pruned += 1
            outcome.pruned_reasons[str(trial_candidate(t.params))] = t.user_attrs.get("reason", "?")
            continue
        outcome.complete += 1
        c = trial_candidate(t.params)
        if outcome.best_us is None or t.value < outcome.best_us:
            outcome.best, outcome.best_us = c, t.value
        if c == task.default:
            outcome.default_us = t.value
    return outcome


def stored_outcome(task: StudyTask, storage: str, skipped: str) -> StudyOutcome:
    """The outcome of a study this run leaves out: what earlier runs stored, if anything."""
    outcome = StudyOutcome(task, skipped=skipped)
    try:
        study = optuna.load_study(study_name=task.name, storage=storage)
    except KeyError:
        return outcome
    return summarize(study, task, outcome)


def run_study(task: StudyTask, measure_factory: MeasureFactory, storage: str, trials: int,
              timeout_s: float | None, seed: int = 0, on_trial: Callable[[], None] | None = None,
              gpu: str = "") -> StudyOutcome:
    """Add up to ``trials`` trials to the task's study (created or resumed) within ``timeout_s``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and summary say enough
    space = task.space
    outcome = StudyOutcome(task)
    candidates = space.candidates()
    if not candidates:
        outcome.skipped = f"none of the {len(space.kernels)} candidate kernels is compiled"
        return outcome
    study = optuna.create_study(study_name=task.name, storage=storage, direction="minimize",
                                sampler=make_sampler(len(candidates), trials, seed), load_if_exists=True)
    attrs = {"arch": space.arch, "family": space.family, "n": space.n, "k": space.k, "m": task.m,
             "group": space.group, "outliers": space.outliers, "layers": list(task.layers),
             "default": str(task.default), "candidates": len(candidates), "gpu": gpu}
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    tried = {trial_candidate(t.params) for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))}
    if tried >= set(candidates):
        outcome.skipped = "already exhaustive"
        return summarize(study, task, outcome)
    if task.default in candidates:
        study.enqueue_trial(candidate_params(task.default), skip_if_exists=True)

    measure = measure_factory(task)  # may allocate operands and compute the reference
    fatal: list[str] = []
    best = [study.best_value if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
            else None]

    def objective(trial: optuna.Trial) -> float:
        cand = suggest(trial, space)
        trial.set_user_attr("candidate", str(cand))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if trial_candidate(t.params) == cand:  # a sampler repeat: no need to time it again
                trial.set_user_attr("duplicate_of", t.number)
                if t.state == TrialState.COMPLETE:
                    return t.value
                trial.set_user_attr("reason", t.user_attrs.get("reason", "pruned before"))
                raise optuna.TrialPruned(f"same as pruned trial {t.number}")
        try:
            r = measure(cand, best[0])
        except Exception as e:  # noqa: BLE001 - any failure prunes the candidate, never the study
            reason = str(e) or type(e).__name__
            trial.set_user_attr("reason", reason)
            if getattr(e, "fatal", False):
                fatal.append(reason)
                study.stop()
            raise optuna.TrialPruned(reason) from None
        for key in ("median_us", "min_us", "max_us", "iters", "timing"):
            if key in r:
                trial.set_user_attr(key, r[key])
        value = float(r["median_us"])
        if best[0] is None or value < best[0]:
            best[0] = value
        return value

    def after_trial(study_: optuna.Study, _trial) -> None:
        outcome.new_trials += 1
        if on_trial:
            on_trial()

    study.optimize(objective, n_trials=trials, timeout=timeout_s, callbacks=[after_trial],
                   gc_after_trial=False)
    summarize(study, task, outcome)
    if fatal:
        outcome.fatal = (f"{task.name}: {fatal[0]} (the CUDA context is lost; rerun the same command: "
                         "finished trials are kept in the study database)")
    return outcome


def run_all(tasks: list[StudyTask], measure_factory: MeasureFactory, storage: str, trials: int,
            time_budget_s: float | None = None, seed: int = 0, progress: bool = True,
            gpu: str = "") -> list[StudyOutcome]:
    """Run every task's study in order within the overall time budget; returns one outcome each
    (a study the budget or a fatal error left out has ``skipped`` set)."""
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    start = time.monotonic()
    deadline = start + time_budget_s if time_budget_s else math.inf
    bar = tqdm(total=len(tasks) * trials, unit="trial", disable=not progress, dynamic_ncols=True)
    outcomes: list[StudyOutcome] = []
    stop_reason = None
    for i, task in enumerate(tasks):
        left = deadline - time.monotonic()
        if stop_reason is None and left <= 0:
            stop_reason = "time budget used up (rerun to resume)"
        if stop_reason:
            outcomes.append(stored_outcome(task, storage, stop_reason))
            bar.total -= trials
            continue
        bar.set_description(task.name.rsplit("/space-", 1)[0])
        timeout = None if math.isinf(left) else left / (len(tasks) - i)
        out = run_study(task, measure_factory, storage, trials, timeout, seed, lambda: bar.update(1), gpu)
        stop_reason = out.fatal
        bar.total -= trials - out.new_trials
        bar.refresh()
        if out.best_us is not None:
            bar.set_postfix_str(f"best {out.best_us:.1f} us ({out.best.kernel.split('_', 3)[3][:24]})")
        outcomes.append(out)
    bar.close()
    return outcomes
