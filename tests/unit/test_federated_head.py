"""The federated task head (healthfm_core/eval/federated_head.py) against the pooled fit it
approximates: an independent solver on the pooled rows (probes.fit_logistic, Newton)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.head_sites import head_sites

from healthfm_core.eval.federated_head import federated_standardizer, fit_federated_logistic
from healthfm_core.eval.probes import Standardizer, fit_logistic


def test_federated_standardisation_is_the_pooled_one() -> None:
    sites = head_sites()
    pooled = Standardizer.fit(np.concatenate([s.x_train for s in sites.values()]))
    fed = federated_standardizer(list(sites.values()))
    np.testing.assert_allclose(fed.mean, pooled.mean, rtol=1e-12)
    np.testing.assert_allclose(fed.scale, pooled.scale, rtol=1e-10)


def test_federated_head_converges_to_the_pooled_optimum() -> None:
    sites = head_sites()
    head, n = fit_federated_logistic(sites, c_grid=(0.1,), rounds=1500, local_steps=1)
    assert n == {"site0": 300, "site1": 120, "site2": 60}
    x = np.concatenate([s.x_train for s in sites.values()])
    y = np.concatenate([s.y_train for s in sites.values()])
    w, b = fit_logistic(Standardizer.fit(x).transform(x), y, 0.1)
    np.testing.assert_allclose(head.weight, w, atol=2e-4)
    assert head.bias == pytest.approx(b, abs=2e-4)
    # With several local steps per round (client drift) it still lands near the optimum.
    drift, _ = fit_federated_logistic(sites, c_grid=(0.1,), rounds=300, local_steps=5)
    np.testing.assert_allclose(drift.weight, w, atol=0.05)


def test_federated_head_refuses_one_class() -> None:
    sites = head_sites()
    for s in sites.values():
        s.y_train[:] = False
    with pytest.raises(ValueError, match="one class"):
        fit_federated_logistic(sites)
