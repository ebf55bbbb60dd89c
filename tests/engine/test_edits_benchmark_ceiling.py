"""The ground-truth ceiling of benchmarks/edits_retraining.py against a direct computation.

Each seed's retrained change is signal + independent noise. The ceiling sqrt(K r / (1 + (K − 1) r)), r the
seed-vs-seed Pearson, must equal the Pearson between the signal itself (a perfect estimate) and the mean of the
K seeds. With 20,000 values the sampling error of either Pearson is about 0.005: tolerance 0.02.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.edits_retraining import (
    Outcome,
    RemovalSet,
    accuracy_ceiling,
    given_back,
    group_values,
    loss_table,
    pearson,
    query_table,
    resolved_signs,
    truth_ceiling,
)
from worker.attribution import EditOptions


def members_of(seed_changes: list[np.ndarray], query: int | None) -> list[tuple[RemovalSet, Outcome]]:
    return [
        (
            RemovalSet("group", torch.arange(3), query),
            Outcome(changes.mean(0), changes, [0.9] * changes.shape[0], 1.0),
        )
        for changes in seed_changes
    ]


@pytest.mark.parametrize("seeds", [2, 3])
def test_ceiling_is_the_pearson_of_a_perfect_estimate(seeds: int) -> None:
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(200, 100))  # 200 sets, 100 queries each
    changes = [s + 1.5 * rng.normal(size=(seeds, 100)) for s in signal]
    members = members_of(changes, None)
    r, sign, ceiling = truth_ceiling(members)
    truth = group_values(members, [o.retrained_change for _, o in members])
    perfect = pearson(signal.reshape(-1), truth)
    expected_r = 1 / (1 + 1.5**2)  # var(signal) / (var(signal) + var(noise))
    assert r == pytest.approx(expected_r, abs=0.02)
    assert ceiling == pytest.approx(perfect, abs=0.02)
    assert 0.5 < sign < 1.0


def test_own_query_sets_take_their_query_only_and_identical_seeds_agree() -> None:
    rng = np.random.default_rng(1)
    changes = []
    for _ in range(6):
        row = rng.normal(size=(1, 4))
        changes.append(np.repeat(row, 3, axis=0))  # every seed retrains to the same change
    members = members_of(changes, 2)
    assert group_values(members, [o.retrained_change for _, o in members]).tolist() == [float(c[0, 2]) for c in changes]
    r, sign, ceiling = truth_ceiling(members)
    assert r == pytest.approx(1.0) and sign == 1.0 and ceiling == pytest.approx(1.0)
    one_seed = members_of([c[:1] for c in changes], 2)
    assert all(np.isnan(v) for v in truth_ceiling(one_seed))


def test_accuracy_ceiling_is_each_seed_against_the_mean_of_the_others() -> None:
    changes = np.zeros((3, 2))
    first = (RemovalSet("group", torch.arange(3), None), Outcome(changes.mean(0), changes, [0.90, 0.92, 0.94], 1.0))
    second = (RemovalSet("group", torch.arange(3), None), Outcome(changes.mean(0), changes, [0.95, 0.95, 0.95], 1.0))
    # first set: 0.90 − 0.93, 0.92 − 0.92, 0.94 − 0.91; second: three zeros
    typical, worst = accuracy_ceiling([first, second])
    assert typical == pytest.approx(0.06 / 6) and worst == pytest.approx(0.03)
    one_seed = (RemovalSet("group", torch.arange(3), None), Outcome(changes[0], changes[:1], [0.9], 1.0))
    assert all(np.isnan(v) for v in accuracy_ceiling([one_seed]))


def test_edited_models_are_compared_as_means_over_seeds_and_each_with_its_own_seed() -> None:
    changes = np.array([[0.1, 0.2], [0.3, 0.0], [0.2, 0.4]])
    outcome = Outcome(changes.mean(0), changes, [0.90, 0.92, 0.94], 1.0)
    outcome.edited_changes["newton"] = np.array([[0.0, 0.3], [0.2, 0.1], [0.4, 0.2]])
    outcome.edited_accuracies["newton"] = [0.91, 0.90, 0.95]
    assert outcome.edited_change("newton").tolist() == pytest.approx([0.2, 0.2])
    assert outcome.edited_accuracy("newton") == pytest.approx(0.92)
    # seed by seed: 0.91 − 0.90, 0.90 − 0.92, 0.95 − 0.94 (the means agree, the seeds do not)
    assert outcome.same_seed_gaps("newton").tolist() == pytest.approx([0.01, -0.02, 0.01])
    assert outcome.edited_accuracy("newton") - outcome.retrained_accuracy == pytest.approx(0.0)


def test_a_sign_is_resolved_only_beyond_two_standard_errors_of_the_seed_mean() -> None:
    # per query (columns), three seeds: a clear change, one at the noise floor, one that flips between seeds,
    # and two with seed std 1 (standard error 1/√3) at 1.9 and 2.1 standard errors from zero
    clear = [0.50, 0.52, 0.48]
    floor = [1e-4, 0.0, -1e-4]
    flipping = [0.03, -0.02, 0.01]
    below, above = 1.9 / np.sqrt(3), 2.1 / np.sqrt(3)
    changes = np.array([clear, floor, flipping, [below - 1, below, below + 1], [above - 1, above, above + 1]]).T
    members = members_of([changes], None)  # (seeds, queries)
    assert resolved_signs(members).tolist() == [True, False, False, False, True]
    one_seed = members_of([changes[:1]], None)
    assert not resolved_signs(one_seed).any()


def test_resolved_signs_follow_group_values_for_own_query_sets() -> None:
    # own-query sets measure one query's value each: the mask has one entry per set, in the sets' order
    resolved = np.array([[0.5, 1e-4], [0.52, -1e-4], [0.48, 0.0]])  # query 0 clear, query 1 at the floor
    members = members_of([resolved, resolved], 0) + members_of([resolved], 1)
    assert resolved_signs(members).tolist() == [True, True, False]


def test_the_loss_table_counts_the_edits_that_would_warn() -> None:
    # full-model loss 0.01, constant 1.01: what was learned is 1.0; a rise to 0.015 gives back 0.5%, to 0.03 2%
    # seed 1's edit is 2 points below its retrain
    outcome = Outcome(np.zeros(1), np.zeros((2, 1)), [0.9, 0.9], 1.0, constant_loss=1.01)
    outcome.retrained_losses = [(0.01, 0.011), (0.01, 0.012)]
    outcome.edited_losses = {"newton": [(0.01, 0.015), (0.01, 0.03)]}
    outcome.edited_accuracies = {"newton": [0.905, 0.88]}
    assert given_back(0.01, 0.03, 1.01) == pytest.approx(0.02)
    lines = loss_table([outcome], {"newton": EditOptions()})
    retrained, newton = lines[-2], lines[-1]
    assert retrained.endswith("| 0/2 | 0.20% | — |") and newton.endswith("| 1/2 | 0.50% | 2.00% |")
    assert "0.50% / 1.25% /" in newton  # min / median of the shares given back


def test_the_query_table_counts_each_seed_against_its_own_retrain() -> None:
    # query 1's top-10 set, three seeds: retrains +0.2, −0.1, −0.3 (two lower the loss); edits +0.1, +0.2, −0.4
    # agree with their own seeds' retrains on seeds 0 and 2 only, while their mean (−0.033) has the retrained
    # mean's sign (−0.067); query 0's set: every edit agrees; the self-influence set (no query) is left out
    first = np.array([[0.5, 0.2], [0.4, -0.1], [0.6, -0.3]])
    second = np.array([[0.1, 0.0], [0.2, 0.0], [0.3, 0.0]])
    members = [
        (RemovalSet("top-10 helpful (own query)", torch.arange(3), 1), Outcome(first.mean(0), first, [0.9] * 3, 1.0)),
        (RemovalSet("top-10 helpful (own query)", torch.arange(3), 0), Outcome(second.mean(0), second, [0.9] * 3, 1.0)),
        (RemovalSet("top-10 self-influence", torch.arange(3), None), Outcome(first.mean(0), first, [0.9] * 3, 1.0)),
    ]
    members[0][1].edited_changes["newton"] = np.array([[0.0, 0.1], [0.0, 0.2], [0.0, -0.4]])
    members[1][1].edited_changes["newton"] = np.array([[0.2, 0.0], [0.1, 0.0], [0.4, 0.0]])
    members[2][1].edited_changes["newton"] = np.zeros((3, 2))
    sets, outcomes = [s for s, _ in members], [o for _, o in members]
    lines = query_table(sets, outcomes, {"newton": EditOptions()}, np.array([0.01, 0.002]), torch.tensor([3, 7]))
    rows = [line for line in lines if line.startswith("| top-10")]
    assert len(rows) == 3  # two queries and the size's summary; nothing of the self-influence set
    assert rows[0].startswith("| top-10 helpful (own query) | 1 (7) | 2.00e-03 | -6.67e-02 ± 1.5e-01 | ")
    assert rows[0].endswith("| 2/3 | +2.00e-01 | -3.33e-02, 2/3 |")
    assert rows[1].endswith("| 0/3 | +1.00e-01 | +2.33e-01, 3/3 |")
    assert rows[2].endswith("| 83% (5/6) |")
    no_own_query = query_table(sets[2:], outcomes[2:], {"newton": EditOptions()}, np.zeros(2), torch.tensor([3, 7]))
    assert no_own_query == []
