"""One Ray Tune experiment for the training searches of many categories.

Every category keeps its own searcher (an Optuna study) and its own scheduler (ASHA rungs), so a category's
configurations are proposed from its own results and a trial is stopped only for doing worse than trials of
its own category, while the categories' trials share the cluster side by side. Tune sees one searcher and
one scheduler, which pass each trial to its category's (`trial.config["category"]`).
"""

from __future__ import annotations

import pickle

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher


class CategorySearch(Searcher):
    """Asks the categories' searchers in turn, in the order given (the largest category first), `samples`
    times each, and tells each searcher the results of its own trials only. The searchers must propose
    whenever asked, as OptunaSearch does; each receives the experiment's search space."""

    def __init__(self, searchers: dict[str, Searcher], samples: int, metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        # not named `searcher`: Tune's SearchGenerator takes an object with that attribute for a wrapper
        self.by_category = searchers
        self.samples = samples
        self.suggested = dict.fromkeys(searchers, 0)
        self.category_of: dict[str, str] = {}  # trial id -> the category whose searcher proposed it

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        return all([s.set_search_properties(metric, mode, config, **spec) for s in self.by_category.values()])

    def suggest(self, trial_id: str) -> dict | str:
        waiting = [c for c, count in self.suggested.items() if count < self.samples]
        if not waiting:
            return Searcher.FINISHED
        category = min(waiting, key=self.suggested.__getitem__)  # the first of those asked least
        config = self.by_category[category].suggest(trial_id)
        self.suggested[category] += 1
        self.category_of[trial_id] = category
        return {**config, "category": category}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.by_category[self.category_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.by_category[self.category_of[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        """Tune saves the searcher with the experiment's state, so that `--resume` goes on where it was."""
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))


class CategoryScheduler(FIFOScheduler):
    """Tells each category's scheduler of its own trials only, so that ASHA's rungs never compare trials of
    different categories; the trials start in the order they were added (FIFO)."""

    def __init__(self, schedulers: dict[str, TrialScheduler]) -> None:
        super().__init__()
        self.by_category = schedulers

    def of(self, trial: Trial) -> TrialScheduler:
        return self.by_category[trial.config["category"]]

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self.of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self.of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        return self.of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self.of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self.of(trial).on_trial_remove(tune_controller, trial)
