"""The built-in `per_class` space is exhaustive: on the cached maps of a real tiny run its study picks the
candidate that a brute force over every (epoch, λ, n) finds best, with the documented tie-break."""

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from test_run_lifecycle import ScoredCandidates, sampled_study_plan

from tfsearch.maps.cache import read_map_set
from tfsearch.maps.fusion import fuse
from tfsearch.run.selection.stage import study_spec
from tfsearch.run.selection.study import CHOICE_ATTR, best_candidate, candidate_of, run_study
from tfsearch.run.space import load_space
from tfsearch.store.studies import open_studies
from tfsearch.transfusion.job import TrainDir

# AUROC values are multiples of 1 / (2 · positives · negatives): rounded this far, equal values stay equal
DIGITS = 9


def test_the_builtin_per_class_space_enumerates_every_milestone_lambda_and_n():
    space = load_space("per_class")
    assert space.enumerated and space.trials == 0
    assert space.values("kernel", 7) == (1, 3, 5, 7, 9, 11, 13, 15)
    lams = space.values("lam", 0.95)
    assert len(lams) == 51 and lams[0] == 0.5 and lams[-1] == 1.0 and 0.95 in lams
    assert np.allclose(np.diff(lams), 0.01)
    assert space.epoch_choices((50, 100, 150)) == (50, 100, 150)


@pytest.mark.parametrize("category", ["disk", "stripes"])
def test_exhaustive_per_class_picks_the_brute_force_best_candidate(shared_run, tmp_path, category):
    plan = dataclasses.replace(shared_run.plan, space=load_space("per_class"))
    spec = study_spec(plan, [category])
    study = run_study(open_studies(tmp_path / "studies.db"), spec)

    # every candidate scored independently: the fused maps' maxima ranked by scikit-learn
    brute = {}
    for model, epoch in spec.checkpoints:
        maps = read_map_set(TrainDir(plan.train_dir(category, model)).maps(epoch, plan.selection_split))
        labels = np.asarray(maps.labels)
        for kernel in plan.space.values("kernel", plan.profile.kernel):
            for lam in plan.space.values("lam", plan.profile.lam):
                fused = fuse(maps.m_disc, maps.m_recon, lam, kernel)
                score = roc_auc_score(labels, fused.reshape(len(fused), -1).max(axis=1))
                brute[model, epoch, lam, kernel] = round(float(score), DIGITS)
    assert len(set(brute.values())) > 1  # the candidates differ: the choice means something

    trials = {(t.user_attrs["model"], t.user_attrs["epoch"], t.user_attrs["lam"], t.user_attrs["kernel"]): t
              for t in study.trials}  # fmt: skip
    assert set(trials) == set(brute)  # every candidate, once
    assert all(round(t.value, DIGITS) == brute[key] for key, t in trials.items())

    best = max(brute.values())
    chosen, choice = best_candidate(study, spec.default)
    assert round(choice["value"], DIGITS) == best
    default_key = (spec.default.model, spec.default.epoch, spec.default.lam, spec.default.kernel)
    if brute[default_key] == best:  # the default wins a tie
        assert choice["trial"] is None and chosen == spec.default
    else:  # then the earliest candidate
        earliest = min((t for key, t in trials.items() if brute[key] == best), key=lambda t: t.number)
        assert choice["trial"] == earliest.number and chosen == candidate_of(earliest)


def test_the_choice_names_its_configuration_and_one_naming_only_its_trial_still_reads(tmp_path):
    """A study's choice holds the chosen configuration, so the tables need not read thousands of trials back
    to find it; a choice that names only the trial (studies of older run folders) gives the same one."""
    spec = sampled_study_plan(ScoredCandidates())
    study = run_study(open_studies(tmp_path / "studies.db"), spec)
    chosen, choice = best_candidate(study, spec.default)
    assert choice["trial"] is not None and chosen != spec.default
    assert choice["selected"] == chosen.as_params() and chosen == candidate_of(study.trials[choice["trial"]])
    study.set_user_attr(CHOICE_ATTR, {k: v for k, v in choice.items() if k != "selected"})
    assert best_candidate(study, spec.default)[0] == chosen
